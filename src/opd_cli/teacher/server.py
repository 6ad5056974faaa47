"""The teacher behind a separately started vLLM server (``teacher.url``; ``make serve-teacher``)."""

from __future__ import annotations

import json

import torch

from opd_cli.batch import RolloutBatch, TeacherSupport, TokenizerDecoding, build_batch, encode_prompts
from opd_cli.errors import UserError
from opd_cli.teacher.vllm import VLLMTeacher, support_from_prompt_logprobs, unpadded_rows


class VLLMServerTeacher(TokenizerDecoding, VLLMTeacher):
    """The teacher behind a separately started vLLM server (``teacher.url``; ``make serve-teacher``).

    Scores through the OpenAI-compatible completions endpoint with vLLM's ``prompt_logprobs``
    extension; samples (for the teacher's evaluation) the same way.
    """

    def __init__(self, url: str, tokenizer, timeout_s: float = 600) -> None:
        self.url, self.tokenizer, self.timeout_s = url.rstrip("/"), tokenizer, timeout_s
        self.model = self._request("/v1/models", None)["data"][0]["id"]

    def _request(self, path: str, body: dict | None) -> dict:
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"teacher.url: cannot reach the vLLM teacher server at {self.url}: {e}") from None

    @torch.no_grad()
    def score(self, batch: RolloutBatch, k: int, keep_hidden: bool = False) -> TeacherSupport:
        body = {"model": self.model, "prompt": unpadded_rows(batch), "max_tokens": 1, "prompt_logprobs": k}
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        rows = [
            [None] + [{int(t): (e["logprob"], e["rank"]) for t, e in d.items()} for d in c["prompt_logprobs"][1:]]
            for c in choices
        ]
        return support_from_prompt_logprobs(batch, rows, k)

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        """Samples for evaluation (no sampler log-probs: ``old_logprobs`` are 0)."""
        ids, attn = encode_prompts(self.tokenizer, prompts)
        unpadded = [ids[i][attn[i].bool()].tolist() for i in range(len(prompts))]
        body = {"model": self.model, "prompt": unpadded, "n": n, "temperature": temperature, "top_p": top_p}
        # no seed: one request's n samples would share it and come out identical
        body.update(max_tokens=max_new_tokens, return_token_ids=True)
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])
        width = max(1, max(len(c["token_ids"]) for c in choices))
        response = torch.full((len(choices), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for r, c in enumerate(choices):
            response[r, : len(c["token_ids"])] = torch.tensor(c["token_ids"], dtype=torch.long)
        logps = torch.zeros(response.shape)
        return build_batch(ids, attn, response, logps, self.tokenizer.eos_token_id, n)
