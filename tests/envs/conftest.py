"""Fixtures of the environment tests: small TextWorld games and a tiny ALFWorld data folder, made once
per session (later tests, e.g. opd-train runs with ``task.env.name=textworld``, reuse them)."""

import json
from pathlib import Path

import pytest

# ALFWorld's layout (json_2.1.1/<split>/<task>/<trial>/) of the one hand-made game below
ALFWORLD_TRIAL = "pick_and_place_simple-Apple-None-Fridge-1/trial_T0"

# A scene in ALFRED's PDDL: an apple on a countertop, a closed fridge; the task is to put the apple in the
# fridge (five commands: go to countertop 1, take apple 1 from countertop 1, go to fridge 1, open fridge 1,
# move apple 1 to fridge 1). Names are mangled as ALFWorld's generator writes them.
APPLE = "Apple_bar__plus_00_dot_10_bar__plus_00_dot_90_bar__plus_00_dot_20"
COUNTER = "CounterTop_bar__minus_01_dot_00_bar__plus_00_dot_90_bar__plus_00_dot_50"
FRIDGE = "Fridge_bar__plus_01_dot_00_bar__plus_00_dot_00_bar__plus_00_dot_50"
ALFWORLD_PROBLEM = f"""
(define (problem plan_tiny)
(:domain alfred)
(:objects
    agent1 - agent
    AppleType - otype
    CounterTopType - rtype
    FridgeType - rtype
    {APPLE} - object
    {COUNTER} - receptacle
    {FRIDGE} - receptacle
    loc_bar_0_bar_0_bar_0_bar_30 - location
    loc_bar__minus_4_bar_2_bar_3_bar_45 - location
    loc_bar_4_bar_2_bar_1_bar_0 - location
)
(:init
    (= (total-cost) 0)
    (atLocation agent1 loc_bar_0_bar_0_bar_0_bar_30)
    (receptacleType {COUNTER} CounterTopType)
    (receptacleType {FRIDGE} FridgeType)
    (objectType {APPLE} AppleType)
    (canContain FridgeType AppleType)
    (canContain CounterTopType AppleType)
    (pickupable {APPLE})
    (openable {FRIDGE})
    (receptacleAtLocation {COUNTER} loc_bar__minus_4_bar_2_bar_3_bar_45)
    (receptacleAtLocation {FRIDGE} loc_bar_4_bar_2_bar_1_bar_0)
    (inReceptacle {APPLE} {COUNTER})
    (objectAtLocation {APPLE} loc_bar__minus_4_bar_2_bar_3_bar_45)
)
(:goal (exists (?r - receptacle) (exists (?o - object)
    (and (inReceptacle ?o ?r) (objectType ?o AppleType) (receptacleType ?r FridgeType)))))
)
"""


@pytest.fixture(scope="session")
def textworld_games(tmp_path_factory) -> Path:
    """A directory of three small TextWorld games (2 rooms, 3 objects, a quest of 3 commands; seeds 1-3),
    each ``gameN.z8`` beside its ``gameN.json`` (the game's metadata, its walkthrough among them).

    Made with TextWorld's generator, which compiles each game with Inform 7 (a few seconds each)."""
    import textworld
    from textworld.generator.game import GameOptions

    out = tmp_path_factory.mktemp("textworld_games")
    for seed in (1, 2, 3):
        options = GameOptions()
        options.nb_rooms, options.nb_objects, options.quest_length, options.seeds = 2, 3, 3, seed
        options.path = str(out / f"game{seed}.z8")
        textworld.make(options)
        (out / f"game{seed}.ni").unlink(missing_ok=True)  # the Inform 7 source
    return out


@pytest.fixture(scope="session")
def alfworld_data(tmp_path_factory) -> Path:
    """An ALFWorld data folder (as alfworld-download lays it out) holding one hand-made game in each split,
    written as ALFWorld's generator writes game.tw-pddl: the domain and grammar that alfworld ships, the
    grammar's goal filled in, the scene's problem, and ``solvable``."""
    import alfworld

    logic = Path(alfworld.__file__).parent / "data"
    grammar = (logic / "alfred.twl2").read_text().replace("UNKNOWN GOAL", "put an apple in fridge")
    game = {
        "pddl_domain": (logic / "alfred.pddl").read_text(),
        "grammar": grammar,
        "pddl_problem": ALFWORLD_PROBLEM,
        "solvable": True,
    }
    root = tmp_path_factory.mktemp("alfworld_data")
    for split in ("train", "valid_seen", "valid_unseen"):
        trial = root / "json_2.1.1" / split / ALFWORLD_TRIAL
        trial.mkdir(parents=True)
        (trial / "game.tw-pddl").write_text(json.dumps(game))
        (trial / "traj_data.json").write_text(json.dumps({"task_type": "pick_and_place_simple"}))
    return root
