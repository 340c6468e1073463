"""What the benchmark scripts share (they run as scripts, so this directory is on sys.path)."""

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB. Not getrusage's ru_maxrss: Linux carries that
    over from the forking parent, which would charge the driver's memory to each side's worker."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the benchmarks read peak memory the Linux way)")
