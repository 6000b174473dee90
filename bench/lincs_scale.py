"""Can the project read a whole LINCS release on a laptop? A synthetic level 3 GCTX shaped like GSE92742's.

    python bench/lincs_scale.py [--columns 1300224] [--dir DIR] [--keep]

Writes a GCTX of `--columns` wells x 978 landmark genes (float32; 3,386 plates of 384 wells, 16
vehicle wells per plate, each condition on three replicate plates, 70 cell lines, one of them,
MCF7, on 52 plates: ~20,000 wells), chunked as cmapPy writes GCTX files (chunks of at most 1 MB:
268 columns x 978 rows), with the release's per-well metadata fields. Then, each in its own
process, prints one line each: time and peak RSS of
  - selecting MCF7's wells (`read_lincs(path, cell_id="MCF7")`: only their chunks are read);
  - aggregating the whole file into per-condition changes, each well against its own plate's
    vehicle wells (`aggregate_lincs`, two streaming passes).
Bars (issue 41): selection <= 60 s and <= 1.5 GB; aggregation <= 15 min and <= 3 GB. The file is
deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

WELLS_PER_PLATE, VEHICLE_PER_PLATE, GENES, CHUNK_COLUMNS = 384, 16, 978, 268


def metadata(n_columns: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(row, column) metadata: plates of 384 wells, replicate plates X1-X3 of one batch share conditions."""
    rng = np.random.default_rng(seed)
    n_plates = -(-n_columns // WELLS_PER_PLATE)
    lines = np.array(["MCF7"] + [f"LINE{i:02d}" for i in range(69)])
    batch_line = np.where(np.arange(n_plates // 3 + 1) < 18, 0, rng.integers(1, 70, n_plates // 3 + 1))  # MCF7: 18 x 3
    plate = np.arange(n_columns) // WELLS_PER_PLATE
    batch, replicate = plate // 3, plate % 3 + 1
    well = np.arange(n_columns) % WELLS_PER_PLATE
    vehicle = well < VEHICLE_PER_PLATE
    compound = (batch * 23 + well * 7) % 20_000  # the same wells of one batch's three replicates agree
    dose = np.array(["0.04", "0.12", "0.37", "1.11", "3.33", "10"])[well % 6]
    cols = pd.DataFrame(
        {
            "cell_id": lines[batch_line[batch]],
            "pert_id": np.where(vehicle, "DMSO", np.char.add("BRD-K", np.char.zfill(compound.astype(str), 8))),
            "pert_type": np.where(vehicle, "ctl_vehicle", "trt_cp"),
            "pert_dose": np.where(vehicle, "-666", dose),
            "pert_dose_unit": np.where(vehicle, "-666", "um"),
            "pert_time": np.where(batch % 2 == 0, "24", "6"),
            "pert_time_unit": "h",
            "rna_plate": np.char.add(np.char.add("CPC", batch.astype(str)), np.char.add("_X", replicate.astype(str))),
        },
        index=pd.Index(np.char.add(np.char.add("P", plate.astype(str)), np.char.add(":W", well.astype(str)))),
    )
    rows = pd.DataFrame({"pr_is_lm": "1", "pr_gene_symbol": [f"G{i}" for i in range(GENES)]})
    rows.index = pd.Index([str(1000 + i) for i in range(GENES)])
    return rows, cols


def write(path: Path, n_columns: int) -> None:
    import h5py

    from scdca.data.gct import write_gctx_metadata

    rows, cols = metadata(n_columns)
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        matrix = f.create_dataset("0/DATA/0/matrix", (n_columns, GENES), dtype="float32", chunks=(CHUNK_COLUMNS, GENES))
        step = CHUNK_COLUMNS * 256
        for start in range(0, n_columns, step):
            stop = min(start + step, n_columns)
            block = rng.standard_normal((stop - start, GENES), dtype=np.float32)
            matrix[start:stop] = block + 8.0
        write_gctx_metadata(f, rows, cols)


def measured(code: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, its printed line) of `code` run in a fresh Python process, which
    reports its own peak resident memory (imports included) as its last line: VmHWM, which a new
    program starts afresh, not ru_maxrss, which Linux carries over from the parent that forked it
    (here the one that wrote the file, 1.6 GB at its peak)."""
    tail = "\nprint([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + tail], check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - t0
    *lines, peak_kb = out.strip().splitlines()
    return seconds, int(peak_kb) / 1024, " ".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--columns", type=int, default=1_300_224)
    p.add_argument("--dir", default=None, help="where to write the file (default: a temporary folder)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="lincs_scale_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic_level3_n{args.columns}x{GENES}.gctx"
    try:
        t0 = time.perf_counter()
        write(path, args.columns)
        size = os.path.getsize(path) / 2**30
        took = time.perf_counter() - t0
        print(f"wrote {path.name}: {args.columns:,} columns x {GENES} genes, {size:.1f} GB ({took:.0f} s)")
        seconds, mb, out = measured(
            "import pandas as pd, scdca\n"
            "table = pd.DataFrame({'pert_id': [f'BRD-K{i:08d}' for i in range(20_000)], 'smiles': 'CCO'})\n"
            f"a = scdca.read_lincs({str(path)!r}, cell_id='MCF7', compounds=table)\n"
            "print(a.n_obs, 'wells')"
        )
        print(f"select one cell line: {out}, {seconds:.1f} s, peak RSS {mb:,.0f} MB (bars: 60 s, 1,536 MB)")
        seconds, mb, out = measured(
            "from scdca.data.lincs import aggregate_lincs\n"
            f"a = aggregate_lincs({str(path)!r})\n"
            "print(a.n_obs, 'conditions')"
        )
        print(f"aggregate the whole file: {out}, {seconds:.0f} s, peak RSS {mb:,.0f} MB (bars: 900 s, 3,072 MB)")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            if not args.dir:
                folder.rmdir()


if __name__ == "__main__":
    main()
