"""The demo environment (envs/demo.py): deterministic instances that its expert solves in 2-4 turns."""

from opd_cli.envs.base import Environment
from opd_cli.envs.demo import ReachTarget, expert_action, instance_numbers


def test_the_expert_solves_every_instance_in_two_to_four_turns():
    lengths = set()
    for seed in range(3):
        for instance in range(300):
            env = ReachTarget(max_turns=6)
            obs, turns, done = env.reset(seed, instance), 0, False
            while not done:
                res = env.step(expert_action(obs))
                obs, turns, done = res.observation, turns + 1, res.done
            assert env.success() and res.reward == 1.0, (seed, instance, obs)
            lengths.add(turns)
    assert lengths == {2, 3, 4}


def test_instances_are_two_digit_and_fixed_by_seed_and_instance():
    pairs = [instance_numbers(s, i) for s in range(3) for i in range(200)]
    assert all(10 <= a <= 99 and 10 <= b <= 99 and 10 <= abs(a - b) <= 36 for a, b in pairs)
    assert pairs == [instance_numbers(s, i) for s in range(3) for i in range(200)]
    assert len(set(pairs)) > 150  # instances differ
    assert ReachTarget().reset(1, 7) == ReachTarget().reset(1, 7) != ReachTarget().reset(2, 7)


def test_a_bad_action_changes_nothing_and_the_turn_limit_ends_the_episode():
    env = ReachTarget(max_turns=3)
    assert isinstance(env, Environment)
    first = env.reset(0, 0)
    res = env.step("jump 4")
    assert res.observation == "Invalid action. " + first
    assert not res.done and res.reward == 0.0
    env.step(" add 1 ")  # whitespace around an action is fine
    assert env.number != instance_numbers(0, 0)[0]
    res = env.step("sub 10")  # not a single digit
    assert res.done and res.observation.startswith("Invalid") and not env.success()
