"""How the command line is built: flags from the config dataclasses, one `--config` mechanism.

Every command is a `Command`: its argparse parser plus the options it records as they are
added (so nothing reads argparse's internals). `add_fields` turns fields of a settings
dataclass (`SimulationConfig`, `PretrainConfig`, `BenchmarkConfig`, `AnnotateConfig`, ...)
into flags whose defaults, types and choices come from the dataclass, never retyped here.

`--config FILE` works the same for every command: a YAML or JSON mapping of the command's
option names (as on the command line, `batch-size` or `batch_size`) becomes its defaults, and
flags given as well override them. `pretrain` and `train` write the file (`command.yaml`) that
reruns them; `benchmark` also reads the `config.json` a run writes (its `from_file` hook).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scdca import storage
from scdca.errors import ScdcaInputError

CONFIG_FILE = "command.yaml"  # what `pretrain` and `train` write into --out; their --config reads it
# options that do not change a run's result: not written to command.yaml
NOT_SETTINGS = {"config", "quiet", "verbose"}


class Command:
    """One sub-command: its parser, its handler and the options it takes."""

    def __init__(self, sub, name: str, func: Callable, *, help: str, from_file: Callable | None = None):
        self.name, self.func, self.from_file = name, func, from_file
        self.parser = sub.add_parser(name, help=help)
        self.parser.set_defaults(func=func)
        sub.commands[name] = self
        self.actions: dict[str, argparse.Action] = {}
        self.add(
            "--config",
            default=None,
            help="YAML/JSON file of this command's options (names as on the command line, e.g. batch-size: 32); "
            "flags given too override it",
        )

    def add(self, *flags, group=None, **kwargs) -> argparse.Action:
        """`add_argument` on the parser (or one of its groups), remembering the option."""
        action = (group or self.parser).add_argument(*flags, **kwargs)
        self.actions[action.dest] = action
        return action

    def group(self, title: str):
        return self.parser.add_argument_group(title)

    def apply_config(self, path: str) -> None:
        """Make the file's values this command's defaults (flags still override them)."""
        raw = storage.read_mapping(
            path, arg="config", hint=f"a YAML or JSON file of option names and values, e.g. --out/{CONFIG_FILE}"
        )
        values = self.from_file(raw) if self.from_file else raw
        values = {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}
        known = set(self.actions) - {"config"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ScdcaInputError(
                f"config: unknown option(s) {unknown!r} for `scdca {self.name}` in {path!r}; known: "
                f"{', '.join(sorted(known))}"
            )
        self.parser.set_defaults(**values)
        for dest in values:
            self.actions[dest].required = False


def add_fields(
    cmd: Command,
    cls: type,
    spec: Mapping[str, tuple[str, str | None]],
    *,
    group=None,
    defaults: Mapping[str, Any] | None = None,
    types: Mapping[str, type] | None = None,
) -> None:
    """Flags for fields of the dataclass `cls`: spec maps field -> (flag, help).

    Default, type and choices (`Literal` fields, listed in the help and checked by the dataclass
    itself, so a bad value gets the same one-line error everywhere) come from the dataclass; a
    bool field that defaults to False becomes a switch. `defaults` replaces a field's default where the
    command line shows it differently (e.g. a list as 'a,b,c'), `types` a field's flag type.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, (flag, help) in spec.items():
        f = fields[name]
        default = (defaults or {}).get(name, field_default(f))
        kind, choices = ((types or {})[name], ()) if name in (types or {}) else _kind(hints[name])
        if kind is bool and default is False:
            cmd.add(flag, action="store_true", help=help, group=group)
            continue
        kwargs = {"default": default, "help": help}
        if choices:  # listed in the help; the dataclass refuses other values, naming the field
            kwargs["help"] = f"{help + '; ' if help else ''}one of: {', '.join(choices)}"
        elif kind in (int, float):
            kwargs["type"] = kind
        cmd.add(flag, group=group, **kwargs)


def field_default(f: dataclasses.Field):
    """A dataclass field's default value (its factory called)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _kind(hint) -> tuple[type | None, tuple]:
    """(plain type, Literal choices) of a field's annotation, unwrapping `X | None`."""
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and len(args) == 1:
        return _kind(args[0])
    return (hint if isinstance(hint, type) else None), ()


def settings(args: argparse.Namespace, cls: type, spec: Mapping[str, tuple[str, str | None]], **extra):
    """The dataclass `cls` built from the parsed flags of `spec` (plus `extra` fields)."""
    values = {name: getattr(args, spec[name][0].lstrip("-").replace("-", "_")) for name in spec}
    return cls(**values, **extra)


def write_command(args: argparse.Namespace) -> None:
    """The resolved options of this run as --out/command.yaml, which `--config` reruns."""
    import yaml

    skip = NOT_SETTINGS | {"func", "command"}
    values = {k.replace("_", "-"): v for k, v in vars(args).items() if k not in skip}
    storage.write_text(Path(args.out) / CONFIG_FILE, yaml.safe_dump(values, sort_keys=False))


def require(args: argparse.Namespace, *dests: str) -> None:
    """Refuse a missing option that may come from the command line or from --config."""
    missing = [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d, None) in (None, "")]
    if missing:
        raise ScdcaInputError(f"{' and '.join(missing)} required (on the command line or in --config FILE)")


# where scdca finds things in the input AnnData: one flag per DataKeys field
KEY_FLAGS = {
    "cell_line": ("--cell-line-key", "obs column with the cell line"),
    "drug": ("--drug-key", "obs column with the drug name"),
    "smiles": ("--smiles-key", "obs column with each drug's SMILES"),
    "dose": ("--dose-key", "obs column with the dose"),
    "control": ("--control-key", "obs column flagging vehicle cells"),
    "gene_symbols": ("--gene-symbols-key", "var column with gene symbols (default: var_names)"),
    "layer": ("--layer", "read expression from this layer instead of X"),
    "degs_uns": ("--degs-key", "uns key with precomputed DEGs per condition"),
}


def add_keys(cmd: Command) -> None:
    """The obs/var key flags (defaults: DataKeys, chemCPA's sci-Plex3 names) and --compounds."""
    from scdca.data.keys import DataKeys

    group = cmd.group("obs/var keys (defaults match chemCPA's sci-Plex3 file)")
    add_fields(cmd, DataKeys, KEY_FLAGS, group=group)
    cmd.add(
        "--compounds",
        default=None,
        group=group,
        help="for LINCS .gct/.gctx --data: CSV/TSV (gzipped or not; the LINCS perturbagen table as it ships) "
        "mapping pert_id or pert_iname to smiles or canonical_smiles (wells without a structure are skipped)",
    )
    from scdca.data.lincs import LincsOptions

    lincs = cmd.group("LINCS files (--data: one .gct/.gctx, several joined by commas, or a folder)")
    add_fields(cmd, LincsOptions, LINCS_FLAGS, group=lincs)


LINCS_FLAGS = {
    "level": ("--lincs-level", "LINCS data level (auto: from the values and metadata)"),
    "col_meta": ("--col-meta", "the inst_info / sig_info table beside a matrix without well metadata"),
    "cell_id": ("--cell-id", "keep only these cell lines (comma-separated)"),
    "pert_time": ("--pert-time", "keep only these treatment times in hours (comma-separated)"),
    "pert_id": ("--pert-id", "keep only these compounds (Broad ids, comma-separated; vehicle wells stay)"),
    "plates": ("--plates", "keep only these plates (comma-separated)"),
    "genes": ("--lincs-genes", "landmark (rows with pr_is_lm 1), or row ids / symbols (comma-separated)"),
}


def lincs_options(args: argparse.Namespace) -> dict:
    """`read_lincs`'s keyword arguments set on the command line."""
    from scdca.data.lincs import LincsOptions

    return settings(args, LincsOptions, LINCS_FLAGS).as_kwargs()


def data_keys(args: argparse.Namespace):
    from scdca.data.keys import DataKeys

    return settings(args, DataKeys, KEY_FLAGS)


def encoder_help(default: str) -> str:
    from scdca.chem.encoders import ENCODERS

    return f"molecule encoder: {', '.join(ENCODERS.names())} (hf:DIR, table:FILE); default {default}"


def add_training_options(cmd: Command, group) -> None:
    """--epochs, --max-steps, --lr, --precision, --frozen-dtype, --recompute-frozen for the trained models
    (unset: each model's own default)."""
    from scdca.models.scdca.config import ScDCAConfig

    spec = {
        "epochs": ("--epochs", "epochs (scDCA default 20, the paper's)"),
        "max_steps": ("--max-steps", "cap on optimiser steps per fit (CPU budgets)"),
        "lr": ("--lr", "learning rate (scDCA default 1e-4, the paper's)"),
        "precision": ("--precision", "bf16 autocast (scDCA models): auto (default) = on CUDA only"),
        "frozen_dtype": ("--frozen-dtype", "scDCA models: store and run the frozen backbone in this dtype "
                         "(bfloat16: half its memory, faster where the CPU or GPU has bf16; default float32)"),
    }  # fmt: skip
    add_fields(cmd, ScDCAConfig, spec, group=group, defaults=dict.fromkeys(spec))
    cmd.add(
        "--recompute-frozen",
        action="store_true",
        default=None,  # unset: not passed to the model
        help="scDCA adapter models: recompute the frozen layers' activations in the backward pass instead of "
        "storing them (less memory, one more forward pass)",
        group=group,
    )


MODEL_OPTIONS = (
    "backbone", "encoder", "epochs", "max_steps", "lr", "device", "precision", "frozen_dtype", "recompute_frozen"
)  # fmt: skip


def model_options(args: argparse.Namespace) -> dict:
    """The model keyword arguments given on the command line (unset ones left to each model)."""
    return {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k, None) is not None}
