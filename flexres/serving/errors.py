"""What the server answers instead of a prediction: a bad request (4xx), an overload (503 with Retry-After), and a
refusal as a plain value that can travel back from the inference process."""

from __future__ import annotations

from dataclasses import dataclass


class RequestError(ValueError):
    """A request the server cannot serve as asked: answered with ``status`` (4xx) and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Refused:
    """A RequestError as a plain value, to travel back from the inference process (exceptions with extra
    constructor arguments do not survive pickling)."""

    status: int
    message: str

    @classmethod
    def of(cls, error: RequestError) -> Refused:
        return cls(error.status, str(error))

    def error(self) -> RequestError:
        return RequestError(self.status, self.message)


class Overloaded(RuntimeError):
    """The server cannot take the request without breaking its latency target or queue bound (HTTP 503), to be answered
    after ``delay_s`` (the pacing of refusals under a flood, see ``RefusalPacer``)."""

    def __init__(self, message: str, retry_after: int, delay_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.delay_s = delay_s
