"""A client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's
server, Ollama...), sending an assembled context.

The request is ``POST {base_url}/chat/completions`` with ``Authorization: Bearer KEY`` (when a
key is given) and the JSON body ``{"model": MODEL, "messages": [...], "temperature": T}``;
the answer is the first choice's message content. The standard library's HTTP client does it:
one request needs no extra dependency.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from mmret.errors import InputError, MmretError

#: Where the endpoint, model and key come from when not given.
ENV_BASE_URL, ENV_MODEL, ENV_KEY = "OPENAI_BASE_URL", "MMRET_CHAT_MODEL", "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class ChatError(MmretError):
    """The endpoint could not be reached or refused the request."""


@dataclass(frozen=True)
class ChatEndpoint:
    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0

    @classmethod
    def from_options(
        cls, base_url: str | None, model: str | None, api_key: str | None
    ) -> ChatEndpoint:
        """Options first, then ``OPENAI_BASE_URL``, ``MMRET_CHAT_MODEL``, ``OPENAI_API_KEY``."""
        model = model or os.environ.get(ENV_MODEL)
        if not model:
            raise InputError(f"name the chat model with --chat-model or ${ENV_MODEL}")
        return cls(
            (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/"),
            model,
            api_key or os.environ.get(ENV_KEY),
        )

    def request(self, messages: list[dict[str, Any]], temperature: float) -> urllib.request.Request:
        """The exact HTTP request :meth:`complete` sends."""
        body = {"model": self.model, "messages": messages, "temperature": temperature}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode(),
            headers=headers,
            method="POST",
        )

    def complete(self, messages: list[dict[str, Any]], temperature: float = 0.0) -> str:
        """The model's answer to ``messages``."""
        try:
            with urllib.request.urlopen(
                self.request(messages, temperature), timeout=self.timeout
            ) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise ChatError(f"{self.base_url}: HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            raise ChatError(f"{self.base_url}: cannot reach the endpoint ({error})") from None
        except json.JSONDecodeError:
            raise ChatError(f"{self.base_url}: the reply is not JSON") from None
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ChatError(f"{self.base_url}: the reply holds no choices[0].message") from None
