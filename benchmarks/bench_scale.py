"""How a federated round's cost grows with the number of sites and with the model's size (issue 19).

    .venv/bin/python benchmarks/bench_scale.py                      # the default grid (docs/performance.md)
    .venv/bin/python benchmarks/bench_scale.py --sites 1,3 --models smallcnn --no-sampled   # a quick look

Every point is a real ``fedbreast simulate`` on Flower's Ray simulation engine, started as a child
process and watched from outside: every 0.5 s the whole process tree under it (the command, the
SuperLink, ``flwr-simulation`` with the ServerApp and the Ray driver, Ray's raylet and GCS, the Ray
actors that run the sites) is read from /proc: each process's resident set (RSS) and proportional
set size (PSS, shared pages divided among their users, so the sum is the tree's real footprint;
RSS summed counts shared libraries and Ray's object store once per process) and its CPU time.

The sites are the first N of one generated 100-site federation (8 patients a site on average,
``--data``, generated once), given to ``simulate --sites-dir`` as folders of links, so every
point reads the same data and none pays for generation (their preprocessing caches are built
before the first point, too). Two rounds, of which the second is measured (the first also pays
each Ray actor's first-use costs), fraction-train 1 on the growth curve (every site trains: the
cost per site), bootstrap 100 instead of the preset's 1000 (each evaluate reply's CIs), and images
of 64 x 32 px per view: affordable on 2 shared cores. Unless ``--no-sampled``, item 1's run as a
user types it follows: ``fedbreast simulate --sites 100`` with client sampling (fraction-train
0.5), 2 rounds.

Where the time goes, per round: site compute is the sites' own train_seconds + eval_seconds from
metrics.jsonl (what the sites report; divided by the worker pool, as that many run at once);
serialisation and aggregation are timed here on the same model (a Message pickled and unpickled as
Ray passes it to and from an actor, three crossings per site per round: train out, train back,
evaluate out; Flower's FedAvg ``aggregate_train`` over N replies); the report is ``write_report``
timed again on the finished run; what is left of the round's wall time is scheduling (Flower's
simulation engine and Ray handing messages to actors, the ServerApp's polling and checks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEDBREAST = str(Path(sys.executable).parent / "fedbreast")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MODELS: dict[str, dict[str, str]] = {
    "smallcnn": {"backbone": "smallcnn"},
    "resnet18": {"backbone": "resnet18"},
    "vgg16_bn": {"backbone": "vgg16_bn", "head": "vgg_fc"},
}


# ---- the process tree, from /proc ----------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, CPU ticks user+system, RSS pages) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": the comm may hold spaces
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21]))
    return table


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_kind(cmdline: str) -> str:
    """Which part of the simulation a process is, by its command line."""
    if cmdline.startswith(("ray::ClientAppActor", "ray::IDLE")):  # Ray retitles a worker ray::<actor class>
        return "site workers (Ray actors)"
    if any(s in cmdline for s in ("raylet", "gcs_server", "/ray/", "ray/_private", "ray/dashboard")):
        return "Ray system"
    if "flwr-simulation" in cmdline:
        return "ServerApp + simulation engine (flwr-simulation)"
    if any(s in cmdline for s in ("flower-superlink", "flower-superexec", "bin/flwr ")):
        return "SuperLink + flwr CLI"
    if "fedbreast simulate" in cmdline or " simulate " in cmdline:
        return "fedbreast simulate (driver)"
    return "other"


@dataclass
class TreeWatch:
    """Samples a process tree every ``interval`` seconds on a thread: peak summed RSS and PSS, the
    last CPU time seen of every process (so one that exits keeps what it used up to its last
    sample), and the most Ray actor processes alive at once."""

    root: int
    interval: float = 0.5
    peak_rss: int = 0
    peak_pss: int = 0
    peak_actors: int = 0
    samples: int = 0
    cpu_ticks: dict[int, int] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            if pid in table:
                tree.append(pid)
                todo.extend(children.get(pid, []))
        rss = pss = actors = 0
        for pid in tree:
            # Read each time: a Ray worker starts as default_worker.py and is retitled when it becomes an actor.
            cmdline = _cmdline(pid)
            if cmdline or pid not in self.kinds:  # an exiting process has none: keep what it was
                self.kinds[pid] = process_kind(cmdline)
            self.cpu_ticks[pid] = table[pid][1]
            rss += table[pid][2] * PAGE
            pss += _pss_bytes(pid)
            actors += cmdline.startswith("ray::ClientAppActor")
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_actors = max(self.peak_actors, actors)
        self.samples += 1

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, ticks in self.cpu_ticks.items():
            out[self.kinds[pid]] = out.get(self.kinds[pid], 0.0) + ticks / TICKS
        return {k: round(v, 2) for k, v in sorted(out.items())}


# ---- the federation, and one point -----------------------------------------------------------------


def federation(data: Path, sites: int, patients: int) -> tuple[list[Path], float]:
    """The generated federation (made once: prepare_federation reuses it); seconds it took now."""
    from fedbreast.simulation.simulate import prepare_federation

    t = time.perf_counter()
    dirs = prepare_federation(data, sites, patients, seed=0, echo=lambda line: print("  " + line, flush=True))
    return dirs, time.perf_counter() - t


def warm_caches(site_dirs: list[Path], image: tuple[int, int]) -> float:
    """Build every site's preprocessing cache for this image size before any point (simulate's driver
    would otherwise build them inside the first point that reaches a site, and its CPU would grow with
    the sites new to that point, not with the sites in it); seconds it took now."""
    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.training.tasks import task_for

    cfg = RunConfig(backbone="smallcnn", image_h=image[0], image_w=image[1])  # the cache is per image size, not model
    t = time.perf_counter()
    for d in site_dirs:
        task_for(cfg).open(d, cfg)
    return time.perf_counter() - t


def subset(site_dirs: list[Path], n: int, where: Path) -> Path:
    """A folder of links to the first ``n`` sites (simulate --sites-dir reads sub-folders)."""
    folder = where / f"sites-{n}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for d in site_dirs[:n]:
        (folder / d.name).symlink_to(d.resolve(), target_is_directory=True)
    return folder


def run_point(label: str, args: list[str], out: Path) -> dict[str, Any]:
    """One ``fedbreast simulate`` (``args`` after ``simulate``) watched from outside."""
    if out.exists():
        shutil.rmtree(out)  # simulate resumes from a run directory's checkpoint: start clean
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [FEDBREAST, "simulate", "--out", str(out), *args]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    log = open(out.parent / f"{label}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    watch = TreeWatch(proc.pid)
    watch.start()
    rc = proc.wait()
    watch.stop()
    wall = time.perf_counter() - t0
    log.close()
    if rc != 0:
        raise SystemExit(f"[{label}] fedbreast simulate exited {rc}; see {out.parent / f'{label}.log'}")
    cpu = watch.cpu_by_kind()
    point = {
        "label": label,
        "command": "fedbreast simulate --out " + str(out.relative_to(ROOT)) + " " + " ".join(args),
        "wall_seconds": round(wall, 2),
        "peak_rss_sum_bytes": watch.peak_rss,
        "peak_pss_bytes": watch.peak_pss,
        "peak_ray_actor_processes": watch.peak_actors,
        "cpu_seconds": cpu,
        # The coordinator: the ServerApp's process (with Flower's engine and the Ray driver in it), the
        # SuperLink and the flwr CLI; the driver (fedbreast simulate itself) is the harness, counted apart.
        "coordinator_cpu_seconds": round(sum(v for k, v in cpu.items() if k.startswith(("ServerApp", "SuperLink"))), 2),
        "driver_cpu_seconds": cpu.get("fedbreast simulate (driver)", 0.0),
        "samples": watch.samples,
        "run_dir": str(out),
        **read_run(out),
    }
    print(
        f"[{label}] {wall:.0f} s, peak PSS {watch.peak_pss / 2**30:.2f} GiB (RSS summed {watch.peak_rss / 2**30:.2f}), "
        f"{watch.peak_actors} Ray actors, round {point['round_seconds']:.1f} s",
        flush=True,
    )
    return point


def read_run(run_dir: Path) -> dict[str, Any]:
    """What the run wrote: the last round's costs (round 1 also pays each Ray actor's first
    train and evaluate message, 5-10 s each here: torch's and the metrics' first use in a fresh
    process, a fixed cost per worker that would hide the cost per site), the sites' own seconds
    in it, and sampling's facts over every round."""
    from fedbreast.server.metric_store import MetricStore

    store = MetricStore(run_dir)
    rounds = store.rows("round")
    train, evaluate = store.rows("train"), store.rows("evaluate")
    per_round_trained = [[r["site"] for r in train if r["round"] == k["round"]] for k in rounds]
    simulate_json = json.loads((run_dir / "simulate.json").read_text())
    last = rounds[-1]
    return {
        "rounds": len(rounds),
        "round_seconds": last["seconds"],  # the last round's: what every further round costs
        "first_round_seconds": rounds[0]["seconds"],
        "train_phase_seconds": last["train_phase_seconds"],
        "evaluate_phase_seconds": last["evaluate_phase_seconds"],
        "checkpoint_seconds": last["checkpoint_seconds"],
        "bytes_per_round": last["bytes_sent"] + last["bytes_received"],
        "site_train_seconds_sum": sum(float(r.get("train_seconds", 0.0)) for r in train if r["round"] == last["round"]),
        "site_eval_seconds_sum": sum(
            float(r.get("eval_seconds", 0.0)) for r in evaluate if r["round"] == last["round"]
        ),
        "sites_trained_per_round": [len(t) for t in per_round_trained],
        "a_site_trained_twice_in_a_round": any(len(t) != len(set(t)) for t in per_round_trained),
        "sites_evaluated_per_round": [len([r for r in evaluate if r["round"] == k["round"]]) for k in rounds],
        "failures": len(store.rows("failure")),
        "federated_seconds": simulate_json["federated_seconds"],
        "simulate_seconds": simulate_json["seconds"],
    }


# ---- the parts timed here ----------------------------------------------------------------------------


def model_arrays(model: str, image: tuple[int, int]) -> tuple[dict[str, np.ndarray], int]:
    from fedbreast.shared.config import RunConfig
    from fedbreast.shared.models.factory import build_model

    cfg = RunConfig(image_h=image[0], image_w=image[1], **MODELS[model])  # type: ignore[arg-type]
    arrays = {k: v.detach().numpy().copy() for k, v in build_model(cfg).state_dict().items()}
    return arrays, int(sum(a.size for a in arrays.values()))


def _as_a_task() -> None:
    """Flower stamps every Message with the running task's identity (simulation/inprocess.py does the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _best(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def serialisation_seconds(arrays: dict[str, np.ndarray]) -> float:
    """One crossing of the model: a Message with it pickled and unpickled, as Ray passes a task's
    argument or result between the engine and an actor."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fedbreast.server.exchange import to_record

    _as_a_task()
    msg = Message(
        RecordDict({"arrays": to_record(arrays), "m": MetricRecord({"x": 1})}), dst_node_id=1, message_type="train"
    )
    return _best(lambda: pickle.loads(pickle.dumps(msg, protocol=5)))


def aggregation_seconds(arrays: dict[str, np.ndarray], n: int) -> float:
    """Flower's FedAvg over ``n`` train replies of this model (the coordinator's weighted mean)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from fedbreast.server.exchange import to_record

    _as_a_task()
    record = to_record(arrays)
    replies = []
    for k in range(n):
        m = Message(
            RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 4 + k})}),
            dst_node_id=1,
            message_type="train",
        )
        replies.append(Message(m.content, reply_to=m))
    strategy = FedAvg()
    return _best(lambda: strategy.aggregate_train(1, replies), repeat=2)


def report_seconds(run_dir: Path) -> float:
    from fedbreast.server.report import write_report
    from fedbreast.shared.config import RunConfig

    cfg = RunConfig.from_flower(json.loads((run_dir / "config.json").read_text()))
    # Best of 2: the first call in this process also pays matplotlib's import and font cache.
    return _best(lambda: write_report(run_dir, cfg), repeat=2)


def attribute(point: dict[str, Any], arrays: dict[str, np.ndarray], n_sites: int, workers: int) -> dict[str, float]:
    """The round's wall time split into its parts (module docstring); seconds per round."""
    trained = point["sites_trained_per_round"][-1]
    site_compute = (point["site_train_seconds_sum"] + point["site_eval_seconds_sum"]) / max(1, min(workers, n_sites))
    crossings = 2 * trained + point["sites_evaluated_per_round"][-1]
    serialise = crossings * serialisation_seconds(arrays)
    aggregate = aggregation_seconds(arrays, max(1, trained))
    report = report_seconds(Path(point["run_dir"]))
    parts = {
        "site compute": site_compute,
        "serialisation": serialise,
        "aggregation": aggregate,
        "checkpoint": point["checkpoint_seconds"],
    }
    parts["scheduling (rest of the round)"] = max(0.0, point["round_seconds"] - sum(parts.values()))
    parts["report (after the last round)"] = report
    return {k: round(v, 3) for k, v in parts.items()}


# ---- fits, plot, main ----------------------------------------------------------------------------------


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """b in y ~ a x^b, least squares in log-log; None with fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


METRICS = {  # key -> (plot title, the unit it is plotted in, bytes or seconds per that unit)
    "round_seconds": ("round wall time", "s", 1),
    "coordinator_cpu_seconds": ("coordinator CPU, whole run", "s", 1),
    "peak_pss_bytes": ("peak memory (PSS of the process tree)", "GiB", 2**30),
    "bytes_per_round": ("model bytes per round", "MB", 1e6),
}


def fits(points: list[dict[str, Any]], x_key: str, tail_from: float | None = None) -> dict[str, dict[str, Any]]:
    """Per measure: the log-log slope over all points (y ~ a x^b); with ``tail_from``, also over the
    points from there on, and the straight line y = fixed + per_unit * x through them (a fixed cost,
    e.g. the Ray actors' first use, plus a cost per site: the law a slope below 1 at small x hides)."""
    xs = [p[x_key] for p in points]
    out = {}
    for key in METRICS:
        ys = [p[key] for p in points]
        out[key] = {"slope_all": loglog_slope(xs, ys)}
        if tail_from is not None:
            tail = [(x, y) for x, y in zip(xs, ys) if x >= tail_from]
            out[key]["slope_tail"] = loglog_slope([t[0] for t in tail], [t[1] for t in tail])
            out[key]["tail_from"] = tail_from
            if len(tail) >= 2:
                per_unit, fixed = np.polyfit([t[0] for t in tail], [t[1] for t in tail], 1)
                out[key]["linear_tail"] = {"fixed": float(fixed), "per_unit": float(per_unit)}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Each measure against sites (top) and model parameters (bottom), log-log, with the fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [
        ("sites_axis", "sites", "number of sites (smallcnn)"),
        ("model_axis", "parameters", "model parameters"),
    ]
    fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), 7), squeeze=False)
    for row, (key, x_key, x_label) in enumerate(axes_spec):
        points = result.get(key, [])
        for col, (m, (title, unit, scale)) in enumerate(METRICS.items()):
            ax = axes[row][col]
            slope = result["fits"].get(key, {}).get(m, {}).get("slope_all")
            ax.set_title(
                f"{title} ({unit})" + (f"\nlog-log slope {slope:.2f}" if slope is not None else ""), fontsize=9
            )
            if points:
                xs = [p[x_key] for p in points]
                ys = [p[m] / scale for p in points]
                ax.loglog(xs, ys, "o-")
                if key == "model_axis":
                    for p, x, y in zip(points, xs, ys):
                        ax.annotate(p["model"], (x, y), fontsize=7)
            ax.set_xlabel(x_label)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(fit: dict[str, float], metric: tuple[str, str, float]) -> str:
    _, unit, scale = metric
    return f"{fit['fixed'] / scale:.3g} {unit} + {fit['per_unit'] / scale:.3g} {unit} per site"


def markdown(result: dict[str, Any]) -> str:
    """The JSON's tables as docs/performance.md shows them."""
    gib = 2**30
    lines = [
        "| sites | model | workers (Ray actors seen) | round wall s | run wall s | coordinator CPU s | "
        "driver CPU s | site-worker CPU s | Ray system CPU s | peak PSS GiB | peak RSS summed GiB | MB per round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [*result.get("sites_axis", []), *[p for p in result.get("model_axis", []) if p["model"] != "smallcnn"]]
    if "sampled_100" in result:
        rows.append(result["sampled_100"])
    for p in rows:
        cpu = p["cpu_seconds"]
        lines.append(
            f"| {p['sites']}{' (fraction-train 0.5, 2 rounds)' if p['label'] == 'sampled-100' else ''} | {p['model']} "
            f"| {p['workers']} ({p['peak_ray_actor_processes']}) | {p['round_seconds']:.1f} | {p['wall_seconds']:.0f} "
            f"| {p['coordinator_cpu_seconds']:.1f} | {p['driver_cpu_seconds']:.1f} "
            f"| {cpu.get('site workers (Ray actors)', 0):.1f} "
            f"| {cpu.get('Ray system', 0):.1f} | {p['peak_pss_bytes'] / gib:.2f} | {p['peak_rss_sum_bytes'] / gib:.2f} "
            f"| {p['bytes_per_round'] / 1e6:.1f} |"
        )
    parts = list(next(iter(result.get("sites_axis", [])), {}).get("parts_seconds", {}))
    lines += [
        "",
        "| sites | model | " + " | ".join(parts) + " | largest part of the round |",
        "|---|---|" + "---|" * (len(parts) + 1),
    ]
    for p in [*result.get("sites_axis", []), *[q for q in result.get("model_axis", []) if q["model"] != "smallcnn"]]:
        in_round = {k: v for k, v in p["parts_seconds"].items() if not k.startswith("report")}
        top = max(in_round, key=lambda k: in_round[k])
        lines.append(
            f"| {p['sites']} | {p['model']} | "
            + " | ".join(f"{p['parts_seconds'][k]:.3f}" for k in parts)
            + f" | {top} ({in_round[top] / max(p['round_seconds'], 1e-9):.0%}) |"
        )
    lines += [
        "",
        "| axis | measure | log-log slope, all points | slope from the tail | line through the tail |",
        "|---|---|---|---|---|",
    ]
    for axis, fit in result.get("fits", {}).items():
        for m, f in fit.items():
            tail = f.get("slope_tail")
            all_ = f.get("slope_all")
            lines.append(
                f"| {axis.replace('_axis', '')} | {METRICS[m][0]} | {'n/a' if all_ is None else f'{all_:.2f}'} | "
                + (
                    "-"
                    if "tail_from" not in f
                    else f"{'n/a' if tail is None else f'{tail:.2f}'} (>= {f['tail_from']:g})"
                )
                + f" | {_line(f['linear_tail'], METRICS[m]) if 'linear_tail' in f else '-'} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "runs/scale/data"), help="the generated 100-site federation")
    ap.add_argument("--work", default=str(ROOT / "runs/scale"), help="runs, logs and site links")
    ap.add_argument("--sites", default="1,3,10,30,100", help="the sites axis (smallcnn)")
    ap.add_argument("--models", default="smallcnn,resnet18,vgg16_bn", help="the model axis")
    ap.add_argument("--model-sites", type=int, default=3, help="sites for the model axis")
    ap.add_argument(
        "--federation",
        type=int,
        default=100,
        help="sites generated (once; every point takes the first N): keep it fixed, a new size regenerates all",
    )
    ap.add_argument("--patients", type=int, default=8, help="patients a site, on average")
    ap.add_argument("--rounds", type=int, default=2, help="rounds a point (its last round is the one measured)")
    ap.add_argument("--image-size", default="64x32")
    ap.add_argument("--workers", type=int, default=None, help="simulate --site-workers (default: its own)")
    ap.add_argument("--no-sampled", action="store_true", help="skip item 1's 100-site run with fraction-train 0.5")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scale.json"))
    ap.add_argument(
        "--plot-only", action="store_true", help="refit and redraw from --out's JSON, print its tables; run nothing"
    )
    ap.add_argument(
        "--reattribute", action="store_true", help="time serialisation, aggregation and report again for --out's runs"
    )
    args = ap.parse_args()
    if args.plot_only or args.reattribute:
        out = Path(args.out)
        result = json.loads(out.read_text())
        if args.reattribute:  # the timed parts again, on the runs the JSON names (still in --work)
            for p in [*result["sites_axis"], *result["model_axis"]]:
                arrays, _ = model_arrays(p["model"], tuple(int(v) for v in result["settings"]["image_size"].split("x")))  # type: ignore[arg-type]
                p["parts_seconds"] = attribute(p, arrays, p["sites"], p["workers"])
        result["fits"] = {  # from the JSON's own points, as the code fits them now
            "sites_axis": fits(result["sites_axis"], "sites", tail_from=10),
            "model_axis": fits(result["model_axis"], "parameters"),
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_suffix(".png"))
        print(markdown(result))
        return
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    image = tuple(int(v) for v in args.image_size.split("x"))
    sites_axis = [int(s) for s in args.sites.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    n_max = max([*sites_axis, args.model_sites, args.federation, 0 if args.no_sampled else 100])
    print(f"federation: {n_max} sites x ~{args.patients} patients in {data}", flush=True)
    site_dirs, prepare_s = federation(data, n_max, args.patients)
    warm_s = warm_caches(site_dirs, image)  # type: ignore[arg-type]
    print(f"caches of {len(site_dirs)} sites ready in {warm_s:.0f} s", flush=True)

    from fedbreast.simulation.flower_runner import default_workers

    common = ["--rounds", str(args.rounds), "--image-size", args.image_size, "--set", "bootstrap=100"]
    if args.workers is not None:
        common += ["--site-workers", str(args.workers)]

    def workers_for(n: int) -> int:
        return min(n, args.workers) if args.workers is not None else default_workers(n)

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "federation": {
            "sites": n_max,
            "patients_per_site": args.patients,
            "prepare_seconds_now": round(prepare_s, 1),
            "cache_warm_seconds_now": round(warm_s, 1),
        },
        "settings": {"rounds": args.rounds, "image_size": args.image_size, "bootstrap": 100, "fraction_train": 1.0},
    }
    small, _ = model_arrays("smallcnn", image)  # type: ignore[arg-type]
    points = []
    for n in sites_axis:
        label = f"sites-{n}-smallcnn"
        p = run_point(
            label,
            ["--sites-dir", str(subset(site_dirs, n, work)), "--backbone", "smallcnn", *common],
            work / "runs" / label,
        )
        p.update(sites=n, model="smallcnn", workers=workers_for(n))
        p["parts_seconds"] = attribute(p, small, n, workers_for(n))
        points.append(p)
    result["sites_axis"] = points
    points = []
    for m in models:
        arrays, n_params = model_arrays(m, image)  # type: ignore[arg-type]
        label = f"sites-{args.model_sites}-{m}"
        same = [q for q in result["sites_axis"] if q["label"] == label]
        if same:  # smallcnn at the model axis' sites is a point of the sites axis already
            points.append({**same[0], "parameters": n_params})
            continue
        extra = [f"--backbone={MODELS[m]['backbone']}"] + (
            ["--set", f"head={MODELS[m]['head']}"] if "head" in MODELS[m] else []
        )
        p = run_point(
            label,
            ["--sites-dir", str(subset(site_dirs, args.model_sites, work)), *extra, *common],
            work / "runs" / label,
        )
        p.update(sites=args.model_sites, model=m, parameters=n_params, workers=workers_for(args.model_sites))
        p["parts_seconds"] = attribute(p, arrays, args.model_sites, workers_for(args.model_sites))
        points.append(p)
    result["model_axis"] = points
    result["fits"] = {
        "sites_axis": fits(result["sites_axis"], "sites", tail_from=10),
        "model_axis": fits(result["model_axis"], "parameters"),
    }
    if not args.no_sampled:
        # Item 1 as a user types it: generated sites by --sites (the same federation: --data), sampling.
        cmd = [
            "--sites",
            "100",
            "--patients",
            str(args.patients),
            "--data",
            str(data),
            "--backbone",
            "smallcnn",
            "--image-size",
            args.image_size,
            "--rounds",
            "2",
            "--set",
            "fraction-train=0.5",
            "--set",
            "bootstrap=100",
        ]
        if args.workers is not None:
            cmd += ["--site-workers", str(args.workers)]
        p = run_point("sampled-100", cmd, work / "runs" / "sampled-100")
        p.update(sites=100, model="smallcnn", workers=workers_for(100))
        result["sampled_100"] = p
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)


if __name__ == "__main__":
    main()
