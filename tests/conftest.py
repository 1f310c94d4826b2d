import os
import tempfile

# Tests never write to the user's cache; subprocesses inherit this too.
os.environ.setdefault("VARLEN_CACHE", tempfile.mkdtemp(prefix="varlen-test-cache-"))
