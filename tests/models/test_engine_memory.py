"""vLLM sleep mode sequencing (EngineMemory). vLLM's sleep mode itself needs a GPU: on CPU these
tests drive the state machine with a recorder in the engine's place; the refusal of
``rollout.sleep=true`` on CPU runs the real vLLM platform check in tests/models/test_vllm.py."""

import pytest

from opd_cli.models.vllm import EngineMemory


class Recorder:
    """Stands in for ``vllm.LLM``'s two sleep-mode methods, which cannot run without a GPU."""

    def __init__(self) -> None:
        self.calls: list = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None) -> None:
        self.calls.append(("wake_up", tuple(tags)))


def test_student_engine_drops_weights_and_wakes_only_with_new_ones():
    llm = Recorder()
    memory = EngineMemory(llm, 2)
    memory.wake()  # awake: nothing to do
    memory.release()
    memory.release()  # already asleep
    with pytest.raises(RuntimeError, match="dropped its weights"):
        memory.wake()
    memory.wake(load=lambda: llm.calls.append("push"))
    assert llm.calls == [("sleep", 2), ("wake_up", ("weights",)), "push", ("wake_up", ("kv_cache",))]
    assert not memory.asleep


def test_teacher_engine_keeps_weights_on_cpu_between_scorings():
    llm = Recorder()
    memory = EngineMemory(llm, 1)
    for _ in range(2):
        memory.wake()
        llm.calls.append("score")
        memory.release()
    assert llm.calls == ["score", ("sleep", 1), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), "score"] + [
        ("sleep", 1)
    ]


def test_level_zero_never_sleeps():
    llm = Recorder()
    memory = EngineMemory(llm, 0)
    memory.release()
    memory.wake(load=lambda: llm.calls.append("push"))
    assert llm.calls == ["push"]
