"""Tokenizers and chat templates for every kind of model path sluice accepts.

- An HF folder: ``AutoTokenizer`` (tokenizer.json / tokenizer_config.json / chat_template.jinja), never the network.
- A ``.gguf`` file: the tokenizer and chat template stored in its metadata (see ``models/gguf_loader.py``).
- ``skip_tokenizer_init``: no tokenizer at all (token-id prompts in, token ids out, empty text), as vLLM's.
  A folder with no tokenizer files and without that flag fails at start-up with one line
  (``check_tokenizer_files``, called when the engine config is resolved), not deep inside transformers.

Chat prompts are rendered to text by the model's Jinja template and then encoded without adding special tokens
(the template writes its own BOS, as vLLM does). Rendering takes a template's text, never a path: only
``get_chat_template`` (for the command line and the offline API) reads a file, so no request can make the
server read one. Templates render as transformers renders them (the same sandboxed Jinja environment, the same
variables), but bounded (chat_render.py; the server renders in processes of their own, see render_pool.py): a render that runs past CHAT_TEMPLATE_TIMEOUT_S or builds any value or output longer than
its character bound (the server's max_prompt_chars) stops with a ChatTemplateLimitError, a ValueError, before it
takes the process's time or memory. Extra template variables (``enable_thinking``, ...) must be identifiers that are not
``apply_chat_template``'s own parameters (``tokenize`` would return text where ids are expected). ``end_of_turn_token_ids`` finds the token a template closes an
assistant turn with (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), so a chat stops there even when the
tokenizer's eos is a different token.
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sluice.chat_render import CHAT_TEMPLATE_MAX_CHARS, CHAT_TEMPLATE_TIMEOUT_S, ChatRender, plain_template_data
from sluice.chat_render import ChatTemplateLimitError  # noqa: F401 - callers catch it from here

ChatMessage = dict[str, Any]  # {"role": "user", "content": "..."}, as the OpenAI API and HF templates use

# Tried when the template cannot be probed: end-of-turn tokens of the common template families.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_PROBE = "sluice-probe-7f3a"


def is_gguf_path(path: str) -> bool:
    return path.lower().endswith(".gguf") and not os.path.isdir(path)


# Any of these makes a folder loadable by AutoTokenizer (fast, SentencePiece, BPE vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


def check_tokenizer_files(path: str) -> None:
    """ValueError, one line naming the folder and the flag, when ``path`` is a folder without tokenizer files."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                         "give --tokenizer, or pass --skip-tokenizer-init (skip_tokenizer_init=True) to work in "
                         "token ids")


def load_tokenizer(model_config: Any) -> tuple[PreTrainedTokenizerBase | None, str | None]:
    """(tokenizer, chat template) of a resolved ModelConfig; (None, None) with skip_tokenizer_init."""
    if model_config.skip_tokenizer_init:
        return None, None
    tokenizer = get_tokenizer(model_config.model, model_config.tokenizer)
    return tokenizer, get_chat_template(tokenizer)


def get_tokenizer(model_path: str, tokenizer_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``tokenizer_path`` if given, else for ``model_path`` (an HF folder or a .gguf file)."""
    path = tokenizer_path or model_path
    if not path:
        raise ValueError("tokenizer: no model or tokenizer path given")
    if is_gguf_path(path):
        from sluice.models.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer: {path} is neither a model folder nor a .gguf file")
    check_tokenizer_files(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def get_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> str | None:
    """The template to render chats with: ``chat_template`` if given (Jinja text or a path to a file holding it),
    else the model's own (tokenizer_config.json / chat_template.jinja, or the GGUF's metadata); None if neither."""
    if chat_template is not None:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                return f.read()
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the "default" one is for chat
        template = template.get("default")
    return template


def prepare_chat_render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        template_kwargs: Mapping[str, Any] | None = None,
                        tools: Sequence[Mapping[str, Any]] | None = None) -> ChatRender:
    """What rendering this conversation needs, as plain data (see chat_render.py); checks the messages and the
    template variables. ``chat_template``: Jinja text (never a path; see get_chat_template), else the model's
    own; ``template_kwargs``: extra template variables; ``tools``: function definitions ({"type": "function",
    "function": {...}}) for templates that list them."""
    template = chat_template if chat_template is not None else get_chat_template(tokenizer)
    if template is None:
        raise ValueError("chat_template: the model has no chat template; pass one (Jinja text or a file path)")
    if not messages:
        raise ValueError("messages: a chat needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{index}]: expected a dict with 'role' and 'content', got {message!r}")
    template_kwargs = dict(template_kwargs or {})
    check_template_kwargs(tokenizer, template_kwargs)
    # What transformers' apply_chat_template hands its template: messages without None values (reasoning also
    # under the names templates read), the special tokens, then the caller's variables over them.
    variables = {**tokenizer.special_tokens_map, **plain_template_data(template_kwargs)}
    return ChatRender(template, [plain_template_data(m) for m in messages], variables, add_generation_prompt,
                      plain_template_data(list(tools or [])) or None)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                chat_template: str | None = None, add_generation_prompt: bool = True,
                template_kwargs: Mapping[str, Any] | None = None, *, max_chars: int | None = None,
                timeout_s: float = CHAT_TEMPLATE_TIMEOUT_S, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The conversation as the prompt text the model was trained on, rendered in this process (arguments as
    prepare_chat_render's).

    Renders as ``tokenizer.apply_chat_template(..., tokenize=False)`` does, in a bounded sandbox
    (chat_render.py): more than ``max_chars`` characters (default CHAT_TEMPLATE_MAX_CHARS) in the output or any
    value, or more than ``timeout_s`` seconds, is a ChatTemplateLimitError (a ValueError)."""
    job = prepare_chat_render(tokenizer, messages, chat_template, add_generation_prompt, template_kwargs, tools)
    return job.run(max_chars if max_chars is not None else CHAT_TEMPLATE_MAX_CHARS, timeout_s)


def check_template_kwargs(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any]) -> None:
    """ValueError unless every key is an identifier the template can read as a variable."""
    reserved = _apply_chat_template_parameters(type(tokenizer))
    for key in template_kwargs:
        if not isinstance(key, str) or not key.isidentifier() or key in reserved:
            raise ValueError(f"chat_template_kwargs: {key!r} is not allowed (keys must be identifiers other than "
                             f"{', '.join(sorted(reserved))})")


@functools.cache
def _apply_chat_template_parameters(tokenizer_class: type) -> frozenset[str]:
    parameters = inspect.signature(tokenizer_class.apply_chat_template).parameters.values()
    return frozenset({"messages"} | {p.name for p in parameters if p.kind is not p.VAR_KEYWORD and p.name != "self"})


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        tokenize: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                        **template_kwargs: Any) -> list[int] | str:
    """Render ``messages`` with the chat template; token ids when ``tokenize`` (the default), else the text.
    ``tools``: function definitions the template shows the model (as the server's ``tools`` field).

    Encoding adds no special tokens: the template already wrote any BOS the model wants.
    """
    text = render_chat(tokenizer, messages, chat_template, add_generation_prompt, template_kwargs, tools=tools)
    if not tokenize:
        return text
    return tokenizer.encode(text, add_special_tokens=False)


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> list[int]:
    """Token ids that end an assistant turn under this template, to stop on besides ``tokenizer.eos_token_id``.

    Renders a one-exchange chat and reads the special token that follows the assistant's text; falls back to
    the known end-of-turn tokens the template mentions. May include the eos id itself; empty if none found.
    """
    template = get_chat_template(tokenizer, chat_template)
    if template is None:
        return []
    ids = _probe_end_of_turn(tokenizer, template)
    if not ids:
        ids = [tid for token in _KNOWN_END_OF_TURN if token in template
               for tid in [_special_token_id(tokenizer, token)] if tid is not None]
    return sorted(set(ids))


def _probe_end_of_turn(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # templates may raise on shapes they reject; fall back to the known tokens
        return []
    _, found, after = text.rpartition(_PROBE)
    if not found:
        return []
    after_ids = tokenizer.encode(after.lstrip(" "), add_special_tokens=False)
    special_ids = set(tokenizer.all_special_ids) | {
        tid for tid, token in tokenizer.added_tokens_decoder.items() if token.special}
    # Only the first token counts: later ones (e.g. a newline) belong to the next turn.
    return [after_ids[0]] if after_ids and after_ids[0] in special_ids else []


def _special_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return int(tid)
