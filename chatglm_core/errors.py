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
