"""A short, flat error hierarchy. Every message says what to do next.

- ConfigError: a setting, a model path or a tools file is wrong; the user edits configuration.
- RequestError: a caller sent something invalid (messages, parameters); the API maps it to 4xx.
- ParseError: the model's output is not a well-formed call; the agent shows it, it never crashes.
- GenerationError: the backend failed while generating (out of memory, remote engine down).
"""


class ChatGLMError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(ChatGLMError):
    pass


class RequestError(ChatGLMError):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


class ParseError(ChatGLMError):
    pass


class GenerationError(ChatGLMError):
    pass


def check_unicode(value: object, param: str) -> None:
    """RequestError naming the first string in `value` (str, list, dict, nested) that holds a lone
    UTF-16 surrogate: JSON can spell one ("\\ud800") but it is no Unicode text, and tokenizers,
    ast.parse and the kernel's wire protocol all fail on it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"{param} holds a lone UTF-16 surrogate ({value[e.start]!r} at character {e.start}), "
                               "which is not valid Unicode text: send it as UTF-8", param=param) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, param)
            check_unicode(v, f"{param}.{k}" if param else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_unicode(v, f"{param}[{i}]")
