"""vLLM as the rollout engine (``rollout.engine=vllm``): one request per sample, each with its own seed.

vLLM's log-probs are raw (full vocabulary, temperature 1, before top-p), as the rollout
contract asks. The engine runs in-process, colocated with the trainer, and receives the
trained weights after every optimizer step (``sync``).
"""

from __future__ import annotations

import torch

from opd_cli.batch import PromptSampling, RolloutBatch, build_batch
from opd_cli.models.student import export_state_dict
from opd_cli.models.vllm import EngineMemory, _push


class VLLMRollout(PromptSampling):
    """Sampling with vLLM: one request per sample, each with its own seed.

    ``memory`` (sleep mode): ``release()`` after a training rollout gives the engine's GPU
    memory back until ``sync`` brings the next weights.
    """

    sharded = False

    def __init__(self, llm, tokenizer, memory: EngineMemory | None = None) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.memory = memory or EngineMemory(llm, 0)

    def release(self) -> None:
        self.memory.release()

    def _sample(self, ids, attn, n, temperature, top_p, max_new_tokens, seed) -> RolloutBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.memory.wake()
        requests, params = [], []
        for i in range(ids.shape[0]):
            prompt = TokensPrompt(prompt_token_ids=ids[i][attn[i].bool()].tolist())
            for j in range(n):
                requests.append(prompt)
                params.append(
                    SamplingParams(
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_new_tokens,
                        logprobs=0,  # the sampled token's raw log-prob
                        detokenize=False,  # we decode the ids ourselves (decode_responses)
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
        return build_batch(ids, attn, response, logps, self.tokenizer.eos_token_id, n)

    def sync(self, model, sharded: bool = False) -> None:
        """Load the student's current weights into the engine (gathered from ZeRO-3 shards first; a LoRA
        student's adapters merged into copies of their weights, ``export_state_dict``)."""
        if sharded:
            import deepspeed  # only here: a plain-torch run never imports DeepSpeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                state = export_state_dict(model)
        else:
            state = export_state_dict(model)
        self.memory.wake(load=lambda: self.llm.collective_rpc(_push, args=(state,)))
