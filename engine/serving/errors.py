"""The error a handler raises: answered as ``{"error": {message, type, param}}`` (TEI routes: TEI's body)."""
from typing import Optional

from engine.serving.protocol import ERROR_TYPES


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type or ERROR_TYPES.get(status, "server_error")
