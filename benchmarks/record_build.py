"""One build's record (benchmarks/build_scale.sh): /usr/bin/time -v's wall time and peak RSS, the manifest's storage
and validation, the stage the progress log reached, and the load average (the machine is shared: say how busy)."""

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path


def time_field(text: str, label: str) -> str | None:
    found = re.search(re.escape(label) + r".*?: (.*)", text)
    return found.group(1).strip() if found else None


def last_progress(log: str) -> str | None:
    """The last progress-bar state tqdm wrote (bars redraw with carriage returns)."""
    states = [s.strip() for s in re.split(r"[\r\n]", log) if "|" in s and "%" in s]
    return states[-1] if states else None


def main():
    parser = argparse.ArgumentParser()
    for name in ("time", "manifest", "log"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--exit-code", type=int, required=True)
    parser.add_argument("--load-before", default="")
    parser.add_argument("--load-after", default="")
    args = parser.parse_args()
    timing = args.time.read_text() if args.time.exists() else ""
    rss = time_field(timing, "Maximum resident set size (kbytes)")
    text = args.manifest.read_text() if args.manifest.exists() else ""
    manifest = json.loads(text) if text.strip() else {}
    log = args.log.read_text(errors="replace") if args.log.exists() else ""
    print(json.dumps({
        "command": args.command, "exit_code": args.exit_code, "completed": args.exit_code == 0 and bool(manifest),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "load_average_1_5_15": {"before": args.load_before, "after": args.load_after},
        "wall_clock": time_field(timing, "Elapsed (wall clock) time"),
        "cpu_percent": time_field(timing, "Percent of CPU this job got"),
        "build_seconds": manifest.get("build_seconds"),
        "stage_seconds": manifest.get("stage_seconds"),
        "peak_rss_mib": round(int(rss) / 1024) if rss else None,
        "last_progress": None if manifest else last_progress(log),
        "storage": manifest.get("storage"), "validation": manifest.get("validation"),
    }, indent=2))


if __name__ == "__main__":
    main()
