"""Writes ``put_apple_in_fridge/game.tw-pddl``: a small ALFRED-style game of our own (a kitchen with a
countertop holding an apple and bread, a fridge and a microwave; goal: put an apple in the fridge),
for ALFWorld's shipped PDDL domain and grammar (``alfworld/data/alfred.{pddl,twl2}``). The game file
embeds that domain and grammar, as ALFWorld's downloaded games do; rerun this script with alfworld
installed to regenerate it: ``python tests/data/alfworld/make_game.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# ALFRED object ids, mangled the way ALFWorld's games spell them ("|" -> "_bar_", "-" -> "_minus_",
# "+" -> "_plus_", "." -> "_dot_"); ALFWorld's AlfredDemangler turns them into "apple 1", ...
APPLE = "Apple_bar__plus_00_dot_10_bar__plus_00_dot_95_bar__minus_01_dot_20"
BREAD = "Bread_bar__minus_00_dot_30_bar__plus_00_dot_95_bar__minus_01_dot_10"
COUNTER = "CounterTop_bar__plus_00_dot_00_bar__plus_00_dot_90_bar__minus_01_dot_25"
FRIDGE = "Fridge_bar__minus_02_dot_00_bar__plus_00_dot_00_bar__plus_00_dot_50"
MICROWAVE = "Microwave_bar__plus_01_dot_50_bar__plus_00_dot_90_bar__minus_01_dot_30"
LOCATIONS = {
    "start": "loc_bar_0_bar_0_bar_0_bar_0",
    COUNTER: "loc_bar_0_bar__minus_4_bar_2_bar_45",
    FRIDGE: "loc_bar__minus_7_bar_2_bar_3_bar_0",
    MICROWAVE: "loc_bar_6_bar__minus_4_bar_2_bar_30",
}
GOAL = "put an apple in fridge"

PROBLEM = f"""
(define (problem leafe_fast_test_put_apple_in_fridge)
  (:domain alfred)
  (:objects
    agent1 - agent
    {' '.join(sorted(set(LOCATIONS.values())))} - location
    {COUNTER} {FRIDGE} {MICROWAVE} - receptacle
    {APPLE} {BREAD} - object
    CounterTopType FridgeType MicrowaveType SinkBasinType - rtype
    AppleType BreadType KnifeType ButterKnifeType - otype
  )
  (:init
    (atLocation agent1 {LOCATIONS['start']})
    (receptacleAtLocation {COUNTER} {LOCATIONS[COUNTER]})
    (receptacleAtLocation {FRIDGE} {LOCATIONS[FRIDGE]})
    (receptacleAtLocation {MICROWAVE} {LOCATIONS[MICROWAVE]})
    (receptacleType {COUNTER} CounterTopType)
    (receptacleType {FRIDGE} FridgeType)
    (receptacleType {MICROWAVE} MicrowaveType)
    (openable {FRIDGE})
    (openable {MICROWAVE})
    (objectType {APPLE} AppleType)
    (objectType {BREAD} BreadType)
    (pickupable {APPLE})
    (pickupable {BREAD})
    (coolable {APPLE})
    (heatable {APPLE})
    (heatable {BREAD})
    (inReceptacle {APPLE} {COUNTER})
    (inReceptacle {BREAD} {COUNTER})
    (objectAtLocation {APPLE} {LOCATIONS[COUNTER]})
    (objectAtLocation {BREAD} {LOCATIONS[COUNTER]})
    (canContain CounterTopType AppleType)
    (canContain CounterTopType BreadType)
    (canContain FridgeType AppleType)
    (canContain FridgeType BreadType)
    (canContain MicrowaveType AppleType)
    (canContain MicrowaveType BreadType)
  )
  (:goal (exists (?o - object ?r - receptacle)
            (and (objectType ?o AppleType) (receptacleType ?r FridgeType) (inReceptacle ?o ?r))))
)
"""

WALKTHROUGH = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1", "open fridge 1",
               "move apple 1 to fridge 1"]


def main() -> None:
    import alfworld

    data = Path(os.path.dirname(alfworld.__file__)) / "data"
    game = {
        "pddl_domain": (data / "alfred.pddl").read_text(),
        "grammar": (data / "alfred.twl2").read_text().replace("UNKNOWN GOAL", GOAL),
        "pddl_problem": PROBLEM,
        "solvable": True,
        "walkthrough": WALKTHROUGH,
    }
    out = Path(__file__).parent / "put_apple_in_fridge" / "game.tw-pddl"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(game, indent=1))
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
