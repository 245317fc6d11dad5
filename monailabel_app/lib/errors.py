"""Errors the ibisagent app raises for bad requests and bad configuration.

MONAI Label 0.8.5 has no handler that maps its own `MONAILabelException` to an HTTP status: raised from an infer task
it reaches the client as a bare "500 Internal Server Error". `RequestError` is both a `MONAILabelException`
(INVALID_INPUT, for code that calls the app directly) and FastAPI's `HTTPException`, which FastAPI answers with the
given 4xx status and `{"detail": message}`.
"""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException


class RequestError(MONAILabelException, HTTPException):
    """A request the server refuses: `status` is the HTTP status (400 bad parameter, 404 unknown image or session,
    409 busy session, 410 expired session); `message` names the field, the value and what was expected."""

    def __init__(self, status: int, message: str):
        MONAILabelException.__init__(self, MONAILabelError.INVALID_INPUT, message)
        HTTPException.__init__(self, status_code=status, detail=message)


class ConfigError(MONAILabelException):
    """The server's --conf settings are unusable; raised at start-up so the server never runs misconfigured."""

    def __init__(self, message: str):
        super().__init__(MONAILabelError.APP_INIT_ERROR, message)

    def __str__(self) -> str:
        return self.msg
