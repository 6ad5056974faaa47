"""ALFWorld's text games as an environment (envs/alfworld.py), on a hand-made game in ALFWorld's data layout
(tests/envs/conftest.py): ALFWorld's own data (alfworld-download) is not fetched here."""

import json

import pytest

from opd_cli.envs.alfworld import ALFWorldEnv, split_games
from opd_cli.envs.base import Environment
from opd_cli.envs.registry import env_factory
from opd_cli.envs.rollout import Budget, PlainFormat, run_episodes
from opd_cli.errors import UserError
from opd_cli.rollout.hf import HFRollout

from .conftest import ALFWORLD_TRIAL

WALKTHROUGH = [
    "go to countertop 1",
    "take apple 1 from countertop 1",
    "go to fridge 1",
    "open fridge 1",
    "move apple 1 to fridge 1",
]


def test_the_walkthrough_reaches_the_goal(alfworld_data):
    env = ALFWorldEnv(data_dir=str(alfworld_data), split="valid_seen")
    assert isinstance(env, Environment) and env.num_instances(0) == 1
    assert env.files == [str(alfworld_data / "json_2.1.1" / "valid_seen" / ALFWORLD_TRIAL / "game.tw-pddl")]
    first = env.reset(0, 0)
    assert first.startswith("You are in the middle of a room.") and "Welcome" not in first
    assert first.endswith("Your task is to: put an apple in fridge.") and "countertop 1" in first
    steps = [env.step(a) for a in WALKTHROUGH]
    assert [s.done for s in steps] == [False] * 4 + [True] and [s.reward for s in steps] == [0.0] * 4 + [1.0]
    assert steps[0].observation == "You arrive at countertop 1. On the countertop 1, you see a apple 1."
    assert env.success()
    assert env.reset(0, 3) == first and not env.success()  # instance 3 of 1 game; a reset starts over


def test_a_command_that_is_not_admissible_changes_nothing(alfworld_data):
    env = ALFWorldEnv(data_dir=str(alfworld_data), max_steps=10)
    env.reset(0, 0)
    for action in ("take apple 1 from countertop 1", "fly away", "", "go to\nthe moon ☃"):
        r = env.step(action)
        assert r.observation == "Nothing happens." and not r.done and r.reward == 0.0
    assert env.step("  Go to   CounterTop 1\n").observation.startswith("You arrive at countertop 1.")  # case, spaces


def test_max_steps_and_the_admissible_commands(alfworld_data):
    env = ALFWorldEnv(data_dir=str(alfworld_data), max_steps=2, admissible_commands=True)
    first = env.reset(0, 0)
    assert first.endswith("\nAdmissible actions: go to countertop 1, go to fridge 1, inventory, look.")
    r = env.step("go to countertop 1")
    assert "take apple 1 from countertop 1" in r.observation.rsplit("Admissible actions:", 1)[1]
    assert not r.done and env.step("look").done and not env.success()


def test_the_data_folder_defaults_to_alfworld_data_and_games_takes_a_glob(alfworld_data, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(alfworld_data))
    assert ALFWorldEnv().files == [str(alfworld_data / "json_2.1.1" / "train" / ALFWORLD_TRIAL / "game.tw-pddl")]
    assert len(ALFWorldEnv(games=str(alfworld_data)).files) == 3  # every split's game, found recursively
    assert len(ALFWorldEnv(games=str(alfworld_data / "json_2.1.1" / "valid_*" / "*" / "*" / "*.tw-pddl")).files) == 2


def test_games_are_chosen_as_alfworld_chooses_them(alfworld_data, tmp_path):
    """A task type not asked for, an unsolvable game, a movable-receptacle task and a folder without
    traj_data.json are all left out."""
    trial = alfworld_data / "json_2.1.1" / "train" / ALFWORLD_TRIAL
    game = json.loads((trial / "game.tw-pddl").read_text())
    split = tmp_path / "json_2.1.1" / "train"
    for name, task_type, solvable in [
        ("a/trial", "pick_and_place_simple", True),
        ("b/trial", "pick_heat_then_place_in_recep", True),
        ("c/trial", "pick_and_place_simple", False),
        ("movable_recep-d/trial", "pick_and_place_simple", True),
    ]:
        (split / name).mkdir(parents=True)
        (split / name / "game.tw-pddl").write_text(json.dumps({**game, "solvable": solvable}))
        (split / name / "traj_data.json").write_text(json.dumps({"task_type": task_type}))
    (split / "e" / "trial").mkdir(parents=True)
    (split / "e" / "trial" / "game.tw-pddl").write_text(json.dumps(game))
    found = lambda types: [f.split("/")[-3] for f in split_games(str(split), types)]  # noqa: E731
    assert found((1, 2, 3, 4, 5, 6)) == ["a", "b"] and found((4,)) == ["b"]
    assert ALFWorldEnv(data_dir=str(tmp_path), task_types=[1]).num_instances(0) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (
            {"data_dir": "{missing}"},
            "task.env.args.data_dir: {missing}/json_2.1.1/train holds no solvable ALFWorld game",
        ),
        ({"data_dir": "{data}", "task_types": [2]}, "holds no solvable ALFWorld game of task types [2]"),
        ({"games": "{missing}/*.tw-pddl"}, "task.env.args.games: '{missing}/*.tw-pddl' holds no ALFWorld game"),
        (
            {"data_dir": "{data}", "split": "test"},
            "task.env.args.split: 'test' is not an ALFWorld split; allowed: train,",
        ),
        ({"data_dir": "{data}", "task_types": [7]}, "task.env.args.task_types: give a non-empty list of ALFWorld task"),
        ({"data_dir": "{data}", "task_types": []}, "task.env.args.task_types: give a non-empty list"),
        ({"data_dir": "{data}", "max_steps": 0}, "task.env.args.max_steps: must be a whole number of at least 1"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_key(alfworld_data, tmp_path, args, message):
    where = {"missing": tmp_path / "nothing", "data": alfworld_data}
    args = {k: v.format(**where) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(UserError) as e:
        env_factory("alfworld", args)
    assert message.format(**where) in str(e.value) and "\n" not in str(e.value)
    if "data_dir" in message:
        assert "alfworld-download" in str(e.value)


def test_run_episodes_on_alfworld(alfworld_data, tiny_model, tiny_tokenizer):
    """A tiny HF student through run_episodes: the rows alternate its actions (response_mask) with the
    game's answers, which do not count as actions."""
    fmt = PlainFormat()
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    envs = [env_factory("alfworld", {"data_dir": str(alfworld_data), "max_steps": 2})() for _ in range(2)]
    batch, episodes = run_episodes(
        HFRollout(tiny_model, tiny_tokenizer), tiny_tokenizer, envs, [(0, 0), (1, 0)], fmt, Budget(4, 2000, 6),
        1.0, 1.0, seed=0, stop=["\n"],
    )  # fmt: skip
    P = batch.prompt_len
    for row, ep in enumerate(episodes):
        assert "Your task is to: put an apple in fridge." in ep.first_observation
        assert len(ep.turns) == 2 and not ep.failed and not ep.truncated and not ep.success
        act = batch.response_mask[row, P:][batch.attention_mask[row, P:].bool()].tolist()
        n1, obs = ep.turns[0].action_tokens, encode(fmt.after(ep.turns[0].observation))
        assert act == [True] * n1 + [False] * len(obs) + [True] * ep.turns[1].action_tokens
