"""One summary of the bench results that gpu_check.sh collected: ``python3 bench/summary.py DIR``.

Reads DIR/*.json written by the bench scripts' ``--json`` and DIR/stages.txt
(stage, exit status, seconds), and prints one table per figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, print_table  # noqa: E402


def main(folder: str) -> int:
    root = Path(folder)
    stages = root / "stages.txt"
    if stages.is_file():
        rows = []
        for line in stages.read_text().splitlines():
            name, rc, seconds = (line.split() + ["", "", ""])[:3]
            status = {"0": "ok", "124": "TIMED OUT", "137": "KILLED (timeout)"}.get(rc, f"failed (rc {rc})")
            rows.append(dict(stage=name, status=status, seconds=seconds))
        print_table(rows, [("stage", "stage"), ("status", "status"), ("seconds", "s")], title="stages")
    results = {}
    order = ["throughput", "sweep", "compile", "checkpoint", "memory", "startup"]
    for path in sorted(root.glob("*.json"), key=lambda f: (order.index(f.stem) if f.stem in order else 99, f.stem)):
        try:
            results[path.stem] = json.loads(path.read_text())
        except ValueError:
            print(f"{path.name}: unreadable (the stage was probably cut off)")
    device = next((r["device"] for r in results.values() if "device" in r), "?")
    print(f"\ndevice: {device}")

    for key, result in results.items():
        if "compare" in result:
            s = result.get("setting", {})
            print_table(result["compare"], [
                ("name", "loop"), ("tokens_per_s", "real tok/s"), ("mfu", "MFU"), ("share", "real share"),
                ("peak_gb", "peak GiB"), ("time_s", "epoch s"), ("steps", "steps"), ("ours_x", "ours x"),
                ("error", "note")],
                title=f"[{key}] throughput vs baselines: {s.get('model')} "
                      f"{'full' if s.get('full') else 'LoRA'}, batch {s.get('batch_size')}, "
                      f"{s.get('examples')} examples, {s.get('precision')}")
        if "sweep" in result:
            print_table(result["sweep"], [
                ("mode", "mode"), ("batch", "batch"), ("seq", "seq"), ("tokens_per_s", "tok/s"), ("mfu", "MFU"),
                ("peak_gb", "peak GiB"), ("step_s", "s/step"), ("error", "note")],
                title=f"[{key}] our loop at fixed shape (N={fmt(result.get('n_params', 0) / 1e9)}B)")
        if "save_state" in result:
            print_table(result["save_state"], [
                ("mode", "mode"), ("optimizer", "optimizer"), ("save_s", "save_state s"), ("mb", "MiB"),
                ("tokens_per_s", "tok/s"), ("share_gsm8k", "share GSM8K epoch"), ("share_class", "share of 65 s"),
                ("share_bench", "share bench"), ("error", "note")],
                title=f"[{key}] checkpoint: save_state alone (no Ray persist)")
        if "ray" in result:
            print_table(result["ray"], [
                ("mode", "mode"), ("epoch", "epoch"), ("epoch_time_s", "epoch s"), ("checkpoint_time_s", "save s"),
                ("report_s", "report s"), ("mb", "MiB"), ("share", "share")],
                title=f"[{key}] checkpoint inside a Ray Tune trial")
        if "memory" in result:
            print_table(result["memory"], [
                ("mode", "mode"), ("grad_ckpt", "grad ckpt"), ("max_batch", "max batch"),
                ("tokens_at_max", "tokens/step"), ("peak_gb_at_1", "GiB @1"), ("peak_gb_at_max", "GiB @max"),
                ("step_s_at_max", "s/step @max"), ("note", "note")],
                title=f"[{key}] largest batch at seq {result.get('setting', {}).get('seq')}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 bench/summary.py DIR")
    sys.exit(main(sys.argv[1]))
