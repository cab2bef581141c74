"""Sokoban levels without an agent: board model, push rule, deadlock tests, solver, generator.

Everything here is a pure function of immutable values, so the environment (``sokoban.py``) can
snapshot a state as a tuple and the solver can hash states.

Cells are flat indices ``row * width + col``; rows count from the top and columns from the left,
both from 0, the outer wall included. A state is ``(player, boxes)`` with ``boxes`` a frozenset.

Limits, stated plainly:
- The solver is breadth-first over pushes: its answer is optimal in *pushes*, not in moves. It is
  meant for the small levels generated here (up to about 10x10 with 4 boxes); a state budget
  (``max_states``) bounds its work and it returns ``None`` with ``exhausted=True`` past it.
- Deadlock detection is the usual cheap, sound subset (corners, dead squares against a wall,
  frozen groups of boxes such as 2x2 blocks). It never flags a solvable state, but it misses
  deadlocks that need search; the solver catches those.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

DIRECTIONS: tuple[str, ...] = ("up", "down", "left", "right")
_DELTAS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_OPPOSITE = {0: 1, 1: 0, 2: 3, 3: 2}

# Rendering legend (parsing also accepts the common alternatives listed in _PARSE).
WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", "O", "X", "√", "P", "S"
_PARSE = {
    "#": (True, False, False, False),  # wall, target, box, player
    "_": (False, False, False, False),
    " ": (False, False, False, False),
    "-": (False, False, False, False),
    "O": (False, True, False, False),
    ".": (False, True, False, False),
    "X": (False, False, True, False),
    "$": (False, False, True, False),
    "√": (False, True, True, False),
    "*": (False, True, True, False),
    "P": (False, False, False, True),
    "@": (False, False, False, True),
    "S": (False, True, False, True),
    "+": (False, True, False, True),
}

State = tuple[int, frozenset]


@dataclass(frozen=True)
class Level:
    """A board and its start state. Build it with :func:`parse_level` or :func:`make_level`."""

    height: int
    width: int
    walls: frozenset
    targets: frozenset
    boxes: frozenset
    player: int
    # Derived tables, excluded from equality: neighbours[k][cell] is the cell one step in
    # direction k, or -1 when that is a wall or off the board; dead = floor cells from which a
    # box can never reach any target (ignoring other boxes).
    neighbours: tuple = field(compare=False, repr=False, default=())
    dead: frozenset = field(compare=False, repr=False, default=frozenset())

    @property
    def start(self) -> State:
        return (self.player, self.boxes)

    def rc(self, cell: int) -> tuple[int, int]:
        return divmod(cell, self.width)

    def is_wall(self, cell: int) -> bool:
        return cell < 0 or cell in self.walls


def make_level(height: int, width: int, walls, targets, boxes, player: int) -> Level:
    """A validated :class:`Level` with its neighbour table and dead squares computed."""
    walls, targets, boxes = frozenset(walls), frozenset(targets), frozenset(boxes)
    size = height * width
    if not 0 <= player < size or player in walls:
        raise ValueError(f"player cell {player} is not a floor cell of a {height}x{width} board")
    if boxes & walls or targets & walls:
        raise ValueError("a box or target lies on a wall")
    if player in boxes:
        raise ValueError("the player stands on a box")
    if not boxes:
        raise ValueError("a level needs at least one box")
    if len(boxes) != len(targets):
        raise ValueError(f"{len(boxes)} boxes but {len(targets)} targets: they must be equal")
    table = []
    for name in DIRECTIONS:
        dr, dc = _DELTAS[name]
        row = []
        for cell in range(size):
            r, c = divmod(cell, width)
            r2, c2 = r + dr, c + dc
            ok = 0 <= r2 < height and 0 <= c2 < width and (r2 * width + c2) not in walls
            row.append(r2 * width + c2 if ok else -1)
        table.append(tuple(row))
    neighbours = tuple(table)
    dead = _dead_squares(size, walls, targets, neighbours)
    return Level(height, width, walls, targets, boxes, player, neighbours, dead)


def _dead_squares(size: int, walls, targets, nb) -> frozenset:
    """Floor cells from which no push sequence brings a lone box to a target.

    Reverse search from the targets: a box at x reaches y = x + d when x - d is free for the
    player, so from a reachable y we add x = y - d whenever x and x - d are floor."""
    alive = set(targets)
    queue = deque(targets)
    while queue:
        y = queue.popleft()
        for k in range(4):
            back = _OPPOSITE[k]
            x = nb[back][y]  # box comes from y - d ...
            if x < 0 or x in alive:
                continue
            if nb[back][x] < 0:  # ... pushed by a player standing at y - 2d
                continue
            alive.add(x)
            queue.append(x)
    floor = {c for c in range(size) if c not in walls}
    return frozenset(floor - alive)


def parse_level(text: str) -> Level:
    """A level from its text picture (legend in :func:`render`; ``$ . * @ +`` also accepted).

    Short rows are padded with walls; cells off the board count as walls."""
    lines = [ln.rstrip("\n") for ln in text.strip("\n").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise ValueError("empty level text")
    height, width = len(lines), max(len(ln) for ln in lines)
    walls, targets, boxes, players = set(), set(), set(), []
    for r, line in enumerate(lines):
        for c in range(width):
            ch = line[c] if c < len(line) else "#"
            if ch not in _PARSE:
                raise ValueError(f"unknown level character {ch!r} at row {r}, col {c}")
            is_wall, is_target, is_box, is_player = _PARSE[ch]
            cell = r * width + c
            if is_wall:
                walls.add(cell)
            if is_target:
                targets.add(cell)
            if is_box:
                boxes.add(cell)
            if is_player:
                players.append(cell)
    if len(players) != 1:
        raise ValueError(f"a level needs exactly one player, found {len(players)}")
    return make_level(height, width, walls, targets, boxes, players[0])


def render(level: Level, state: State, box_on_target: str = BOX_ON_TARGET) -> str:
    """The board as text, one line per row (legend: ``# _ O X √ P S``)."""
    player, boxes = state
    rows = []
    for r in range(level.height):
        chars = []
        for c in range(level.width):
            cell = r * level.width + c
            target = cell in level.targets
            if cell in level.walls:
                chars.append(WALL)
            elif cell == player:
                chars.append(PLAYER_ON_TARGET if target else PLAYER)
            elif cell in boxes:
                chars.append(box_on_target if target else BOX)
            else:
                chars.append(TARGET if target else FLOOR)
        rows.append("".join(chars))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class MoveOutcome:
    """What one move did. ``blocked`` names the obstacle when nothing moved."""

    state: State
    moved: bool
    pushed_from: int = -1  # box cell before the push, -1 if no push
    pushed_to: int = -1
    blocked: str = ""  # "", "wall", "box_wall" (box against a wall), "box_box" (box against a box)


def apply_move(level: Level, state: State, direction: str) -> MoveOutcome:
    """The standard rule: walk onto floor, push one box onto free floor, nothing else."""
    k = DIRECTIONS.index(direction)
    player, boxes = state
    nxt = level.neighbours[k][player]
    if nxt < 0:
        return MoveOutcome(state, False, blocked="wall")
    if nxt not in boxes:
        return MoveOutcome((nxt, boxes), True)
    beyond = level.neighbours[k][nxt]
    if beyond < 0:
        return MoveOutcome(state, False, blocked="box_wall")
    if beyond in boxes:
        return MoveOutcome(state, False, blocked="box_box")
    new_boxes = (boxes - {nxt}) | {beyond}
    return MoveOutcome((nxt, new_boxes), True, pushed_from=nxt, pushed_to=beyond)


def is_solved(level: Level, boxes: frozenset) -> bool:
    return boxes <= level.targets


def reachable(level: Level, player: int, boxes: frozenset) -> set:
    """Cells the player can walk to without pushing."""
    seen = {player}
    queue = [player]
    nb = level.neighbours
    while queue:
        cell = queue.pop()
        for k in range(4):
            n = nb[k][cell]
            if n >= 0 and n not in boxes and n not in seen:
                seen.add(n)
                queue.append(n)
    return seen


def walk_path(level: Level, start: int, goal: int, boxes: frozenset) -> list[str] | None:
    """A shortest walk (no pushes) from start to goal, as directions; None if unreachable."""
    if start == goal:
        return []
    prev = {start: None}
    queue = deque([start])
    nb = level.neighbours
    while queue:
        cell = queue.popleft()
        for k in range(4):
            n = nb[k][cell]
            if n < 0 or n in boxes or n in prev:
                continue
            prev[n] = (cell, k)
            if n == goal:
                path = []
                while prev[n] is not None:
                    n, kk = prev[n]
                    path.append(DIRECTIONS[kk])
                return path[::-1]
            queue.append(n)
    return None


# ----------------------------------------------------------------------------- deadlocks


@dataclass(frozen=True)
class Deadlock:
    """A provable dead end: ``kind`` is "corner", "dead_square" or "frozen"; ``cells`` the boxes."""

    kind: str
    cells: tuple[int, ...]


def _is_corner(level: Level, cell: int) -> bool:
    nb = level.neighbours
    vertical = nb[0][cell] < 0 or nb[1][cell] < 0
    horizontal = nb[2][cell] < 0 or nb[3][cell] < 0
    return vertical and horizontal


def _frozen(level: Level, cell: int, boxes: frozenset, as_wall: frozenset, group: set) -> bool:
    """Whether the box at ``cell`` can move along neither axis; frozen neighbours join ``group``.

    An axis is blocked by a wall on either side, dead squares on both sides, or a neighbouring
    box that is itself frozen when this box counts as a wall (which ends the recursion)."""
    as_wall = as_wall | {cell}
    nb = level.neighbours
    for a_k, b_k in ((0, 1), (2, 3)):
        a, b = nb[a_k][cell], nb[b_k][cell]
        if a < 0 or b < 0 or a in as_wall or b in as_wall:
            continue
        if a in level.dead and b in level.dead:
            continue
        blocked = False
        for side in (a, b):
            if side in boxes:
                sub: set = set()
                if _frozen(level, side, boxes, as_wall, sub):
                    group |= sub | {side}
                    blocked = True
                    break
        if not blocked:
            return False
    group.add(cell)
    return True


def find_deadlock(level: Level, boxes: frozenset, moved_box: int | None = None) -> Deadlock | None:
    """The first provable deadlock among ``boxes`` (or involving ``moved_box`` only, if given)."""
    candidates = [moved_box] if moved_box is not None else sorted(boxes)
    for cell in candidates:
        if cell in level.targets:
            continue
        if _is_corner(level, cell):
            return Deadlock("corner", (cell,))
        if cell in level.dead:
            return Deadlock("dead_square", (cell,))
    for cell in candidates:
        group: set = set()
        if _frozen(level, cell, boxes, frozenset(), group):
            if any(b not in level.targets for b in group):
                return Deadlock("frozen", tuple(sorted(group)))
    return None


def describe_deadlock(level: Level, deadlock: Deadlock) -> str:
    """One sentence a language model can act on."""
    where = ", ".join(f"(row {r}, col {c})" for r, c in map(level.rc, deadlock.cells))
    if deadlock.kind == "corner":
        return (f"Deadlock: the box at {where} is stuck in a corner that is not a target; "
                "it can never be moved again, so the level can no longer be solved.")
    if deadlock.kind == "dead_square":
        return (f"Deadlock: the box at {where} is against a wall where no target can be reached; "
                "it can only slide along that wall, so the level can no longer be solved.")
    return (f"Deadlock: the boxes at {where} block each other against the walls and cannot move, "
            "and not all of them are on targets, so the level can no longer be solved.")


# ----------------------------------------------------------------------------- solver


@dataclass(frozen=True)
class Solution:
    """An optimal push plan: ``pushes`` lists (box cell, direction); ``moves`` the full walk."""

    pushes: tuple[tuple[int, str], ...]
    moves: tuple[str, ...]

    @property
    def num_pushes(self) -> int:
        return len(self.pushes)


class SolverBudgetExceeded(RuntimeError):
    """The solver stopped at its state budget without an answer either way."""


def solve(level: Level, state: State | None = None, max_states: int = 200_000) -> Solution | None:
    """A plan with the fewest pushes from ``state`` (default: the start), or None if unsolvable.

    Breadth-first over push states; a state is keyed by its boxes and the smallest cell of the
    player's region, so walking never creates new states. Pushes onto dead squares and pushes
    that freeze boxes off target are pruned (both provably hopeless). Raises
    :class:`SolverBudgetExceeded` after ``max_states`` expansions."""
    player, boxes = state if state is not None else level.start
    boxes = frozenset(boxes)
    if is_solved(level, boxes):
        return Solution((), ())
    if find_deadlock(level, boxes) is not None:
        return None
    nb = level.neighbours
    start_region = reachable(level, player, boxes)
    start_key = (min(start_region), boxes)
    # key -> (parent key, (box cell, direction index), player cell before push, player cell after)
    parents: dict = {start_key: None}
    queue = deque([(start_key, player, start_region)])
    expanded = 0
    while queue:
        key, _, region = queue.popleft()
        expanded += 1
        if expanded > max_states:
            raise SolverBudgetExceeded(f"no answer within {max_states} states")
        cur_boxes = key[1]
        for box in cur_boxes:
            for k in range(4):
                dest = nb[k][box]
                if dest < 0 or dest in cur_boxes or dest in level.dead:
                    continue
                pusher = nb[_OPPOSITE[k]][box]
                if pusher < 0 or pusher not in region:
                    continue
                new_boxes = (cur_boxes - {box}) | {dest}
                new_region = reachable(level, box, new_boxes)
                new_key = (min(new_region), new_boxes)
                if new_key in parents:
                    continue
                group: set = set()
                if _frozen(level, dest, new_boxes, frozenset(), group) and any(
                    b not in level.targets for b in group
                ):
                    continue
                parents[new_key] = (key, box, k)
                if is_solved(level, new_boxes):
                    return _rebuild(level, (player, boxes), parents, new_key)
                queue.append((new_key, box, new_region))
    return None


def _rebuild(level: Level, start: State, parents: dict, key) -> Solution:
    pushes = []
    while parents[key] is not None:
        key, box, k = parents[key]
        pushes.append((box, DIRECTIONS[k]))
    pushes.reverse()
    return Solution(tuple(pushes), tuple(plan_moves(level, start, pushes)))


def plan_moves(level: Level, state: State, pushes) -> list[str]:
    """Turn a push plan into moves: walk to each box's far side by a shortest path, then push."""
    player, boxes = state
    moves: list[str] = []
    for box, direction in pushes:
        k = DIRECTIONS.index(direction)
        pusher = level.neighbours[_OPPOSITE[k]][box]
        path = walk_path(level, player, pusher, boxes)
        if path is None:
            raise ValueError(f"push plan is not executable: cannot reach cell {pusher}")
        moves.extend(path)
        moves.append(direction)
        dest = level.neighbours[k][box]
        boxes = (boxes - {box}) | {dest}
        player = box
    return moves


# ----------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class GeneratedLevel:
    level: Level
    solution: Solution
    seed: int

    @property
    def optimal_pushes(self) -> int:
        return self.solution.num_pushes


def _carve_room(rng: random.Random, height: int, width: int, fill: float) -> set:
    """Floor cells dug by a random walk inside the outer wall (connected by construction)."""
    interior = [(r, c) for r in range(1, height - 1) for c in range(1, width - 1)]
    goal = max(4, int(round(fill * len(interior))))
    r, c = rng.choice(interior)
    floor = {(r, c)}
    dr, dc = rng.choice(list(_DELTAS.values()))
    for _ in range(50 * len(interior)):
        if len(floor) >= goal:
            break
        if rng.random() < 0.35:
            dr, dc = rng.choice(list(_DELTAS.values()))
        r2, c2 = r + dr, c + dc
        if not (1 <= r2 < height - 1 and 1 <= c2 < width - 1):
            continue
        r, c = r2, c2
        floor.add((r, c))
        if rng.random() < 0.25:  # widen the corridor now and then
            wr, wc = r + dc, c + dr
            if 1 <= wr < height - 1 and 1 <= wc < width - 1:
                floor.add((wr, wc))
    return {r * width + c for r, c in floor}


def _reverse_play(rng: random.Random, level: Level, steps: int, pull_prob: float) -> State:
    """Walk backwards from the solved board, pulling boxes; return the most scrambled state.

    Every pull undoes a legal push, so the returned state is solvable by construction (the solver
    still checks it and measures the optimum)."""
    nb = level.neighbours
    player = level.player
    boxes = list(level.boxes)  # boxes keep their identity to score displacement
    origin = list(boxes)
    best, best_score = (player, frozenset(boxes)), -1
    for _ in range(steps):
        k = rng.randrange(4)
        nxt = nb[k][player]
        if nxt < 0 or nxt in boxes:
            continue
        behind = nb[_OPPOSITE[k]][player]
        if behind >= 0 and behind in boxes and rng.random() < pull_prob:
            boxes[boxes.index(behind)] = player
        player = nxt
        dists = [
            abs(a // level.width - b // level.width) + abs(a % level.width - b % level.width)
            for a, b in zip(boxes, origin)
        ]
        # Favour moving every box a little over moving one box far.
        score = sum(dists) + 4 * sum(d > 0 for d in dists)
        if score > best_score and not is_solved(level, frozenset(boxes)):
            best, best_score = (player, frozenset(boxes)), score
    return best


def generate_level(
    seed: int,
    height: int = 7,
    width: int = 7,
    num_boxes: int = 2,
    min_pushes: int = 2,
    max_pushes: int | None = None,
    fill: float = 0.6,
    candidates: int = 6,
    max_tries: int = 500,
) -> GeneratedLevel:
    """A solvable level from ``seed`` alone (same seed, same level), with its optimal push count.

    Room carving, boxes on targets, then ``candidates`` reverse plays of which the solver keeps
    the one with the most optimal pushes within ``max_pushes``; a room is rejected when that
    best is below ``min_pushes``."""
    if not (4 <= height <= 16 and 4 <= width <= 16):
        raise ValueError(f"board {height}x{width} out of range (4..16 per side)")
    if not 1 <= num_boxes <= 6:
        raise ValueError(f"num_boxes={num_boxes} out of range (1..6)")
    rng = random.Random(seed)
    for _ in range(max_tries):
        floor = _carve_room(rng, height, width, fill)
        if len(floor) < 2 * num_boxes + 3:
            continue
        cells = sorted(floor)
        targets = rng.sample(cells, num_boxes)
        player = rng.choice([c for c in cells if c not in targets])
        walls = {c for c in range(height * width) if c not in floor}
        solved = make_level(height, width, walls, targets, targets, player)
        best: GeneratedLevel | None = None
        for _ in range(candidates):  # keep the hardest of a few scrambles of this room
            start = _reverse_play(rng, solved, steps=rng.randint(40, 160), pull_prob=0.75)
            if is_solved(solved, start[1]):
                continue
            level = make_level(height, width, walls, targets, start[1], start[0])
            try:
                solution = solve(level, max_states=50_000)
            except SolverBudgetExceeded:
                continue
            if solution is None:
                continue
            n = solution.num_pushes
            if max_pushes is not None and n > max_pushes:
                continue
            if best is None or n > best.optimal_pushes:
                best = GeneratedLevel(level, solution, seed)
        if best is not None and best.optimal_pushes >= min_pushes:
            return best
    raise RuntimeError(
        f"no level with {num_boxes} boxes on {height}x{width} and {min_pushes}..{max_pushes} pushes "
        f"after {max_tries} tries (seed {seed}); relax the push bounds or enlarge the board"
    )
