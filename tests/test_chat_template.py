"""Chat templates render exactly what transformers' apply_chat_template renders, from the same files."""
import json
from datetime import datetime

import pytest
from tokenizers import Tokenizer

from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import TextTokenizer, train_tokenizer
from varlen.serve.chat_template import (ChatTemplateError, FixedChatTemplate, JinjaChatTemplate,
                                        load_chat_template, normalize_messages)

transformers = pytest.importorskip("transformers")

# Qwen2.5-style ChatML: a default system prompt; tool calls through tojson (no HTML escaping, non-ASCII kept).
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\nYou may call: ' + tools | tojson + '<|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
    {%- endif %}
    {%- if message.tool_calls is defined %}
        {{- '<tool_call>' + message.tool_calls | tojson + '</tool_call>' }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3.1-style: bos_token inline, `tools is not none`, strftime_now, trim, namespace, and plain (non-dash) tags whose
# surrounding whitespace only trim_blocks/lstrip_blocks remove.
LLAMA3 = """{{ bos_token }}
{% set ns = namespace(system="") %}
{% if tools is not none %}
Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'] | trim %}
    {% set messages = messages[1:] %}
{% endif %}
<|start_header_id|>system<|end_header_id|>

Today Date: {{ strftime_now("%d %b %Y") }}

{{ ns.system }}<|eot_id|>
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Only user and assistant roles are supported after the system message') }}
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

# Mistral-style: alternation enforced with raise_exception, {% break %} from loopcontrols, {% generation %}.
ALTERNATING = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]{% else %}
{% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}{% endif %}
{% if loop.index >= 6 %}{% break %}{% endif %}
{% endfor %}"""

SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
           "<|im_end|>", "<s>", "</s>"]
CONF = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}, "pad_token": None,
        "add_bos_token": True, "clean_up_tokenization_spaces": False}

CHATS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi {there}"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye <|im_end|>"}],
    "tool_call": [{"role": "user", "content": "Café & <b>tags</b>?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "look", "arguments": "{\"q\": \"<b>é</b>\"}"}}]}],
    "none_fields": [{"role": "user", "content": "x", "name": None},
                    {"role": "assistant", "content": "y", "tool_calls": None}, {"role": "user", "content": "z"}],
}


@pytest.fixture(scope="module")
def tok_json():
    tok = train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:8]], 320)
    tok.tok.add_special_tokens(SPECIAL)
    return tok.tok.to_str()


def model_dir(tmp_path, tok_json, conf=None, jinja=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.json").write_text(tok_json)
    if conf is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


def hf_render(tok_json, template, messages, add_generation_prompt=True, **tokens):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json),
                                              chat_template=template, **tokens)
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", ["CHATML", "LLAMA3", "ALTERNATING"])
def test_render_matches_transformers(tok_json, template, chat, add_generation_prompt):
    source, messages = globals()[template], CHATS[chat]
    tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    ours = JinjaChatTemplate(source, tokens)
    try:
        want = hf_render(tok_json, source, messages, add_generation_prompt, **tokens)
    except Exception as e:  # ALTERNATING refuses a system message: we must refuse it too, saying the same
        with pytest.raises(ChatTemplateError) as err:
            ours.render(messages, add_generation_prompt)
        assert str(e) in str(err.value)
        return
    got = ours.render(messages, add_generation_prompt)
    assert got == want
    assert len(got) > 20


def test_llama3_render_is_what_we_expect(tok_json):
    got = JinjaChatTemplate(LLAMA3, {"bos_token": "<|begin_of_text|>"}).render(CHATS["system"][:2])
    today = datetime.now().strftime("%d %b %Y")
    # trim_blocks eats the newline after a {% tag %} only: the one after {{ bos_token }} stays.
    assert got == ("<|begin_of_text|>\n<|start_header_id|>system<|end_header_id|>\n\nToday Date: " + today +
                   "\n\nBe brief.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nHi {there}<|eot_id|>\n"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_directory_template_matches_autotokenizer_and_encodes_without_extra_bos(tmp_path, tok_json):
    d = model_dir(tmp_path, tok_json, {**CONF, "chat_template": LLAMA3})
    template = load_chat_template(d)
    assert template.carries_special_tokens
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    messages = CHATS["system"]
    text = template.render(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The contract behind carries_special_tokens: encoding the text as is gives transformers' ids.
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    ids = TextTokenizer.load_dir(d).encode(text)
    assert ids == want_ids
    assert ids[0] == hf.convert_tokens_to_ids("<|begin_of_text|>") and ids.count(ids[0]) == 1


def test_chat_template_jinja_file_wins_over_config(tmp_path, tok_json):
    d = model_dir(tmp_path, tok_json, {**CONF, "chat_template": LLAMA3}, jinja=CHATML)
    got = load_chat_template(d).render(CHATS["user"])
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert got == hf.apply_chat_template(CHATS["user"], tokenize=False, add_generation_prompt=True)
    assert got.startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_config_list_of_named_templates_uses_default(tmp_path, tok_json):
    conf = {**CONF, "chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                      {"name": "default", "template": ALTERNATING}]}
    d = model_dir(tmp_path, tok_json, conf)
    got = load_chat_template(d).render(CHATS["none_fields"])
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert got == hf.apply_chat_template(CHATS["none_fields"], tokenize=False, add_generation_prompt=True)
    assert got == "<|begin_of_text|>[INST] x [/INST]y<|eot_id|>[INST] z [/INST]"


def test_raise_exception_is_a_chat_template_error():
    template = JinjaChatTemplate(ALTERNATING, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        JinjaChatTemplate(LLAMA3, {"bos_token": "<s>"}).render([{"role": "tool", "content": "{}"}])


@pytest.mark.parametrize("source, messages, match", [
    ("{{ messages[0].content + 1 }}", [{"role": "user", "content": "a"}], "failed on the messages"),
    ("{{ messages[0].missing.deeper }}", [{"role": "user", "content": "a"}], "rejected the messages"),
    ("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "a"}], "underscore"),
    ("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "a"}], "rejected the messages"),
])
def test_template_failures_are_chat_template_errors(source, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        JinjaChatTemplate(source).render(messages)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"content": "no role"}], r"messages\[0\] must be an object with a string \"role\""),
    ([{"role": "user", "content": 7}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"content\[0\] is a text part"),
])
def test_malformed_messages(messages, match):
    for template in (JinjaChatTemplate(CHATML), FixedChatTemplate()):
        with pytest.raises(ChatTemplateError, match=match):
            template.render(messages)


def test_list_of_text_parts_is_joined(tok_json):
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    assert JinjaChatTemplate(CHATML).render(parts) == hf_render(tok_json, CHATML, joined)
    assert FixedChatTemplate().render(parts) == "<|user|>\nfirst\nsecond\n<|assistant|>\n"
    assert parts[0]["content"][0] == {"type": "text", "text": "first"}  # the caller's messages are untouched


def test_reasoning_fields_are_aliased():
    (m,) = normalize_messages([{"role": "assistant", "content": "4", "reasoning": "2+2"}])
    assert m["reasoning_content"] == m["thinking"] == "2+2"


def test_no_hf_template_falls_back_to_the_fixed_format(tmp_path, tok_json):
    messages = CHATS["system"]
    old = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    for d in (model_dir(tmp_path / "bare", tok_json), model_dir(tmp_path / "conf", tok_json, CONF)):
        template = load_chat_template(d)
        assert not template.carries_special_tokens
        assert template.render(messages) == old
        assert template.render(messages, add_generation_prompt=False) == old.removesuffix("<|assistant|>\n")
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] needs a role \(system, user, assistant\)"):
        template.render([{"role": "tool", "content": "x"}])


def test_chat_template_varlen_overrides_the_fixed_format(tmp_path, tok_json):
    d = model_dir(tmp_path, tok_json, {**CONF, "chat_template_varlen": {"message": "[{role}] {content}\n"}})
    assert load_chat_template(d).render(CHATS["user"]) == "[user] What is 2+2?\n<|assistant|>\n"


@pytest.mark.parametrize("conf, jinja, match", [
    ({"chat_template": "{% for m in messages %}"}, None, "tokenizer_config.json chat_template is not valid Jinja"),
    (None, "{{ unclosed", "chat_template.jinja is not valid Jinja"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, None, "none named \"default\""),
    ({"chat_template": 3}, None, "must be a string or a list"),
    ({"chat_template_varlen": {"message": "{speaker}: {content}"}}, None, "str.format pattern"),
    ({"chat_template_varlen": "plain"}, None, "chat_template_varlen must be an object"),
])
def test_bad_template_files_name_the_file(tmp_path, tok_json, conf, jinja, match):
    d = model_dir(tmp_path, tok_json, conf, jinja)
    with pytest.raises(ValueError, match=match) as err:
        load_chat_template(d)
    assert not isinstance(err.value, ChatTemplateError)  # a broken model dir, not a bad request
    assert str(d) in str(err.value)
