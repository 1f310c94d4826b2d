"""Chat messages -> one prompt string: a model directory's Hugging Face Jinja `chat_template`, or varlen's
fixed role-tag format for models trained without one.

Rendering follows transformers' `apply_chat_template` (utils/chat_template_utils.py): a sandboxed Jinja
environment with trim_blocks/lstrip_blocks and loop controls, the `raise_exception` / `strftime_now` globals,
a `tojson` filter that does not HTML-escape, and the tokenizer's special tokens (bos_token, eos_token, ...)
as variables. A rendered HF prompt already holds its special tokens, so it is encoded as is, without adding a
BOS: `carries_special_tokens` says which kind a template is.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"
# varlen's own models learn this format; tokenizer_config.json's "chat_template_varlen" may replace either part
# (str.format patterns; `message` gets {role} and {content}).
DEFAULT_FORMAT = {"message": "<|{role}|>\n{content}\n", "assistant_prefix": "<|assistant|>\n"}
FIXED_ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered; the server answers 400 with param "messages"."""


# ------------------------------------------------------------------------------ messages, as templates see them

def normalize_messages(messages: Any) -> list[dict]:
    """Plain message dicts the way transformers hands them to a template.

    Keys whose value is None are dropped (templates test for a missing key, and would print "None");
    OpenAI's list-of-parts content becomes one string (text parts joined by newlines, as vLLM does);
    a reasoning field is copied under the names templates read (reasoning_content, thinking).
    """
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string \"role\"")
        message = {k: v for k, v in message.items() if v is not None}
        if "content" in message:
            message["content"] = _content_text(message["content"], f"messages[{i}].content")
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"{where} must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ChatTemplateError(f"{where}[{j}] has type {kind!r}; this model reads text only: send "
                                    f"{{\"type\": \"text\", \"text\": ...}} parts")
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{where}[{j}] is a text part without a string \"text\"")
        texts.append(part["text"])
    return "\n".join(texts)


# ------------------------------------------------------------------------------ the two kinds of template

class ChatTemplate:
    """Renders messages to a prompt string. `carries_special_tokens`: the text already holds BOS and the
    other special tokens, so the caller encodes it without adding any (as transformers'
    apply_chat_template(tokenize=True) does); otherwise the caller frames it as a plain prompt."""

    carries_special_tokens: bool = False

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError


class JinjaChatTemplate(ChatTemplate):
    """A Hugging Face chat template; `special_tokens` are its variables bos_token, eos_token, ...."""

    carries_special_tokens = True

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        self.source, self.special_tokens = source, dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin} is not valid Jinja (line {e.lineno}: {e.message}); fix the template or "
                             f"remove it to use varlen's fixed chat format") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        chat = normalize_messages(messages)
        try:
            # tools/documents are passed as None, not left undefined: templates test `tools is not none`.
            return self._template.render(**self.special_tokens, messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # raise_exception(...), undefined operations, sandbox refusals
            raise ChatTemplateError(f"the model's chat template rejected the messages: {e}") from None
        except Exception as e:  # the template's own Python-level mistakes on these messages (TypeError, ...)
            raise ChatTemplateError(f"the model's chat template failed on the messages: "
                                    f"{type(e).__name__}: {e}") from None


class FixedChatTemplate(ChatTemplate):
    """varlen's role-tag format: `message` per message, then `assistant_prefix` to start the reply."""

    def __init__(self, message: str = DEFAULT_FORMAT["message"],
                 assistant_prefix: str = DEFAULT_FORMAT["assistant_prefix"], origin: str = "chat format"):
        try:
            message.format(role="user", content="")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"{origin} message pattern {message!r} is not a str.format pattern over "
                             f"{{role}} and {{content}} ({type(e).__name__}: {e})") from None
        self.message, self.assistant_prefix = message, assistant_prefix

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        parts = []
        for i, m in enumerate(normalize_messages(messages)):
            if m["role"] not in FIXED_ROLES or not isinstance(m.get("content"), str):
                raise ChatTemplateError(f"messages[{i}] needs a role ({', '.join(FIXED_ROLES)}) and a string "
                                        f"content")
            parts.append(self.message.format(role=m["role"], content=m["content"]))
        return "".join(parts) + (self.assistant_prefix if add_generation_prompt else "")


# ------------------------------------------------------------------------------ loading from a model directory

def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The chat template of the directory holding tokenizer_config.json.

    Where transformers looks, in its order: chat_template.jinja, then tokenizer_config.json's "chat_template"
    (a string, or a list of {"name", "template"} of which "default" is used). Without one, varlen's fixed
    format, with tokenizer_config.json's "chat_template_varlen" {"message", "assistant_prefix"} applied.
    """
    model_dir = Path(model_dir)
    conf_path = model_dir / TOKENIZER_CONFIG
    try:
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {conf_path}: {e}; fix or remove the file") from None
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return JinjaChatTemplate(jinja_file.read_text(encoding="utf-8"), special_tokens(conf), str(jinja_file))
    source = _config_template(conf.get("chat_template"), conf_path)
    if source is not None:
        return JinjaChatTemplate(source, special_tokens(conf), f"{conf_path} chat_template")
    custom = conf.get("chat_template_varlen") or {}
    parts = {**DEFAULT_FORMAT, **custom} if isinstance(custom, dict) else None
    if parts is None or set(parts) != set(DEFAULT_FORMAT) or not all(isinstance(v, str) for v in parts.values()):
        raise ValueError(f"{conf_path} chat_template_varlen must be an object with string \"message\" and/or "
                         f"\"assistant_prefix\" patterns, got {custom!r}")
    return FixedChatTemplate(parts["message"], parts["assistant_prefix"], f"{conf_path} chat_template_varlen")


def _config_template(value: Any, conf_path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{conf_path} chat_template lists templates {sorted(named)} but none named \"default\"; "
                         f"name the chat template \"default\"")
    raise ValueError(f"{conf_path} chat_template must be a string or a list of {{\"name\", \"template\"}} objects")


def special_tokens(conf: dict) -> dict[str, str]:
    """Template variables from tokenizer_config.json: every "*_token" entry that names a token (a string or
    {"content": ...}; e.g. bos_token, eos_token, pad_token) plus a dict "extra_special_tokens", as transformers'
    special_tokens_map gives them."""
    named = {k: v for k, v in conf.items() if k.endswith("_token")}
    extra = conf.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update(extra)
    out = {}
    for key, value in named.items():
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


# ------------------------------------------------------------------------------ the Jinja environment

def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' environment: chat templates are untrusted code, so the sandbox stays, and `namespace`
    and `dict` are replaced by versions that cannot reach Python internals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '): wrong for a prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; serving renders the
    body as is (transformers' AssistantTracker without the tracking)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore names, which would reach CPython internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r}) "
                                                  f"on a namespace")
