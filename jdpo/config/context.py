"""The rules of context parallelism (`mesh.context` > 1: every row's tokens split over devices), checked
before anything loads: the row length must cut into 2 x context chunks (the balanced layout,
`jdpo.parallel.context_layout`), only the blocked kernel, splash and pallas_gpu (those two in the ring)
attend a shard of a row's queries (`jdpo.models.choices.context_refusal`), and the mesh must fit the
devices (`mesh_advice`: the sizes that would)."""

from __future__ import annotations

from jdpo.config.fields import ConfigError
from jdpo.models.choices import context_refusal, deals_blocks


def row_length(cfg) -> int:
    """T of the run's rows (`jdpo.data.layout.row_length_for`: data.row_length, else 2 x max_length)."""
    return int(cfg.data.row_length or 2 * max(int(cfg.data.max_length), 1))


def check_context(cfg) -> None:
    C = cfg.mesh.context
    if C == 1:
        return
    why = context_refusal(cfg.model.attention, C, cfg.model.context_attention)
    if why:
        raise ConfigError(why)
    if cfg.model.context_balance == "blocks":  # auto's kernel is known once the backend is (run_data)
        kernel = "blocked" if cfg.model.attention == "auto" else cfg.model.attention
        try:
            deals_blocks("blocks", kernel, cfg.model.context_attention, C)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.mesh.expert != 1:
        raise ConfigError(
            f"mesh.context={C} with mesh.expert={cfg.mesh.expert}: the expert exchange does not yet take a "
            "row split over devices; use one of the two (mesh.expert: 1 keeps an MoE model's experts "
            "whole on each device)"
        )
    T, split = row_length(cfg), 2 * C
    if T % split:
        down, up = T - T % split, T + split - T % split
        field = "data.row_length" if cfg.data.row_length else "2 x data.max_length (data.row_length unset)"
        fits = f"{down} or {up}" if down else f"{up}"
        raise ConfigError(
            f"{field} = {T} tokens per row does not split over mesh.context={C}: each device holds two "
            f"chunks of the row, so it must be a multiple of 2 x context = {split}; set data.row_length "
            f"to {fits}"
        )


def mesh_advice(mesh, num_devices: int) -> str:
    """What would fit `num_devices`: the context sizes that divide the devices the fixed data / fsdp /
    tensor / expert sizes leave (a -1 axis takes what context leaves)."""
    fixed = 1
    for name in ("data", "fsdp", "tensor", "expert"):
        fixed *= max(getattr(mesh, name), 1)
    if num_devices % fixed:
        return f"; data x fsdp x tensor x expert = {fixed} does not divide the {num_devices} devices"
    room = num_devices // fixed
    ok = [c for c in range(1, room + 1) if room % c == 0]
    return (
        f"; {num_devices} devices over data x fsdp x tensor x expert = {fixed} leave {room}: mesh.context may be "
        f"{', '.join(map(str, ok))}"
    )
