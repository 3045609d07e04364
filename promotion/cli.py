"""``motlens promote``: move a model version candidate → canary → production, gated and audited."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_AUDIT, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2, 3

# flag → PromoteSettings field (flags override MOTLENS_PROMOTE_* environment variables)
_SETTING_FLAGS = {
    "target": "target",
    "overlay": "overlay",
    "manifests_dir": "manifests_dir",
    "namespace": "namespace",
    "steps": "steps",
    "local_url": "local_url",
    "min_samples": "min_samples",
    "max_error_rate": "max_error_rate",
    "max_p99_ratio": "max_p99_ratio",
    "offline_tolerance": "offline_tolerance",
    "paired": "paired",
    "paired_confidence": "paired_confidence",
    "min_step_interval": "min_step_interval_s",
    "actor": "actor",
    "textfile": "textfile",
    "pushgateway_url": "pushgateway_url",
}


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    o = p.add_argument_group("target and safety")
    o.add_argument("--target", choices=("k8s", "gitops", "local"), help="where the rollout lives (default: local)")
    o.add_argument("--dry-run", action="store_true", help="print the patch; change nothing")
    o.add_argument(
        "--force",
        action="store_true",
        help="proceed although live state and registry disagree or gates did not pass",
    )
    o.add_argument("--overlay", help="gitops: overlay under manifests/overlays (cpu, gpu)")
    o.add_argument("--manifests-dir", help="gitops: the manifests/ checkout")
    o.add_argument("--namespace", help="k8s: namespace of the InferenceService")
    o.add_argument("--local-url", help="local: base URL of `motlens serve`")
    o.add_argument("--actor", help="who is acting (default $MOTLENS_PROMOTE_ACTOR, else user@host)")
    o.add_argument("--textfile", help="write promotion metrics to this Prometheus textfile")
    o.add_argument("--pushgateway-url", help="push promotion metrics to this Pushgateway")
    gates = p.add_argument_group("steps and gates")
    gates.add_argument("--steps", help="canary percentages, e.g. 10,25,50,100")
    gates.add_argument("--min-samples", type=int, help="canary requests needed since the last step")
    gates.add_argument("--max-error-rate", type=float, help="canary error-rate ceiling (fraction)")
    gates.add_argument("--max-p99-ratio", type=float, help="canary p99 / production p99 ceiling")
    gates.add_argument("--offline-tolerance", type=float, help="allowed loss on each offline metric")
    gates.add_argument(
        "--paired-confidence",
        type=float,
        help="level of the paired comparison's interval (default 0.9): a metric fails when all of it lies "
        "below -tolerance",
    )
    gates.add_argument(
        "--no-paired",
        dest="paired",
        action="store_const",
        const=False,
        help="compare the runs' logged metrics, not both heads on the candidate's held-out texts",
    )
    gates.add_argument("--min-step-interval", type=float, help="auto: seconds at a percent before stepping")
    return p


def _percent(text: str) -> int:
    """argparse type: a canary share, a whole number 0–100 (refused as the command is read)."""
    from promotion.rollout import RolloutError, check_percent

    try:
        return check_percent(int(text))
    except (ValueError, RolloutError):
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 100, got {text!r}") from None


def _with_reason(default: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--reason",
        default=default,
        help="why (recorded in the promotion_events row and the versions' promotion.last_reason tags)"
        + (f"; default {default!r}" if default else ""),
    )
    return p


def register(sub: argparse._SubParsersAction) -> None:
    common = _common()
    reason = _with_reason()
    p = sub.add_parser(
        "promote", help="roll a model version out: canary, gates, promote or roll back", description=__doc__
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="ACTION")
    st = verbs.add_parser("status", parents=[common], help="aliases, live state, drift, canary health")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    canary = verbs.add_parser("canary", help="start a canary or set its share")
    cverbs = canary.add_subparsers(dest="canary_verb", required=True, metavar="start|set")
    start = cverbs.add_parser("start", parents=[common, reason], help="canary alias → VERSION; new storage URI at N%%")
    start.add_argument("version", nargs="?", help="registry version (default: the 'candidate' alias)")
    start.add_argument("--percent", type=_percent, required=True, help="canary share, 0–100")
    cset = cverbs.add_parser("set", parents=[common, reason], help="set the canary share (as `kubectl edit` would)")
    cset.add_argument("percent", type=_percent, help="canary share, 0–100")
    verbs.add_parser("advance", parents=[common, reason], help="next step (e.g. 10 → 25 → 50 → 100) if gates pass")
    prom = verbs.add_parser("promote", parents=[common, reason], help="production alias → the canary; percent removed")
    prom.add_argument("version", nargs="?", help="deploy this version directly (first deployment, or --force)")
    verbs.add_parser(
        "rollback",
        parents=[common, _with_reason("manual rollback")],
        help="canary to 0%%, previous spec restored, rejected; with no canary, production back to the "
        "version it replaced (the one left is rejected)",
    )
    verbs.add_parser("auto", parents=[common], help="one scheduled run: advance, promote, roll back or hold")
    sync = verbs.add_parser(
        "sync-overlay",
        help="k8s: copy the live rollout into the overlay's rollout.yaml (run it before `kubectl apply -k`)",
    )
    sync.add_argument("--overlay", help="overlay under manifests/overlays to rewrite (cpu, gpu)")
    sync.add_argument("--manifests-dir", help="the manifests/ checkout")
    sync.add_argument("--namespace", help="namespace of the live InferenceService")
    sync.add_argument("--check", action="store_true", help="write nothing; exit 1 when the overlay differs")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from promotion.settings import PromoteSettings

    overrides = {
        field: getattr(args, flag) for flag, field in _SETTING_FLAGS.items() if getattr(args, flag, None) is not None
    }
    return PromoteSettings(**overrides)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from motlens.cli import MissingExtra, require
    from motlens.errors import report, report_settings
    from promotion.locking import LockBusy
    from promotion.status import read_status
    from promotion.targets import TargetError, make_target
    from promotion.workflow import PartlyDone, Promoter, PromotionError, Refused
    from training.registry import Registry, RegistryError

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        given = {field: "--" + flag.replace("_", "-") for flag, field in _SETTING_FLAGS.items()
                 if getattr(args, flag, None) is not None}  # fmt: skip
        return report_settings("motlens promote", e, given)
    if args.verb not in ("status", "sync-overlay") and (settings.textfile or settings.pushgateway_url):
        require("prometheus_client", "promote")  # the metrics go out after the change: refuse before it
    try:
        if args.verb == "sync-overlay":
            return _sync_overlay(settings, check_only=args.check)
        promoter = Promoter(settings, Registry(), make_target(settings), dry_run=args.dry_run, force=args.force)
        if args.verb == "status":
            return _print_status(read_status(promoter), as_json=args.json)
        outcome = _dispatch(promoter, args)
    except Refused as e:
        print(f"motlens promote: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except PartlyDone as e:  # part of the change stands: not "nothing changed"
        print(f"motlens promote: {e}", file=sys.stderr)
        return EXIT_AUDIT
    except (PromotionError, TargetError, RegistryError, LockBusy) as e:
        print(f"motlens promote: {e}", file=sys.stderr)
        return EXIT_ERROR
    except MissingExtra:  # the install hint, as every command prints it
        raise
    except Exception as e:  # noqa: BLE001 - e.g. the MLflow server is down: one line, not a traceback
        return report("motlens promote", e)
    _print_outcome(outcome)
    return EXIT_OK if outcome.audit_ok else EXIT_AUDIT


def _sync_overlay(settings: Any, *, check_only: bool) -> int:
    from promotion.overlay_sync import sync_overlay
    from promotion.rollout import differences

    result = sync_overlay(settings, check_only=check_only)
    live, overlay = result.live_state, result.overlay_state
    if result.in_sync:
        print(f"{result.file}: in sync with the live rollout ({live.describe()}, {live.storage_uri})")
        return EXIT_OK
    changes = "; ".join(differences(overlay, live))  # overlay → live
    if not result.written:
        print(f"{result.file}: OUT OF SYNC: `kubectl apply -k` would serve {overlay.describe()} instead of the "
              f"live {live.describe()} (overlay → live: {changes})")  # fmt: skip
        return EXIT_AUDIT
    print(f"{result.file}: now holds the live rollout, {live.describe()} ({changes}). Commit it, and apply the "
          "overlay before the next promotion step (or sync again)")  # fmt: skip
    return EXIT_OK


def _dispatch(promoter: Any, args: argparse.Namespace) -> Any:
    if args.verb == "canary":
        if args.canary_verb == "start":
            return promoter.canary_start(args.version, args.percent, reason=args.reason or "")
        return promoter.canary_set(args.percent, reason=args.reason or "")
    if args.verb == "advance":
        return promoter.advance(reason=args.reason or "")
    if args.verb == "promote":
        return promoter.promote(args.version, reason=args.reason or "")
    if args.verb == "rollback":
        return promoter.rollback(reason=args.reason)
    return promoter.auto()


def _print_outcome(outcome: Any) -> None:
    from rich.console import Console

    console = Console()
    for r in outcome.gates:
        colour = {"pass": "green", "fail": "red", "wait": "yellow"}[r.status]
        console.print(f"  gate [bold]{r.name}[/]: [{colour}]{r.status}[/] — {r.detail}", highlight=False)
    for patch in outcome.patches:
        if isinstance(patch, dict) and "content" in patch:
            console.print(f"[bold]{patch['file']}[/]:", highlight=False)
            console.out(patch["content"])
            console.print("[bold]equivalent merge patch[/]:")
            console.out(json.dumps(patch["merge_patch"], indent=2, sort_keys=True))
        else:
            console.out(json.dumps(patch, indent=2, sort_keys=True))
    console.print(f"[bold]{outcome.action}[/]: {outcome.message}", highlight=False)
    if not outcome.audit_ok:
        what = "the change stands, but " if outcome.changed else ""
        console.print(f"[red]{what}the audit trail is incomplete (see the log)[/]")


#: what the next command does with an interrupted change (``Promoter.intent_outlook``)
INTENT_OUTLOOK = {
    "finish": "the next command finishes it (and does nothing else)",
    "recorded": "its audit is written; the next command drops it",
    "unapplied": "it never reached the target; the next command drops it",
    "changed": "the target has changed since: fix the state or re-run with --force (see live vs registry); "
    "the next change that goes ahead records it as abandoned",
}


def _print_status(status: dict[str, Any], *, as_json: bool) -> int:
    """Print what could be read; exit 2 (no access) when the live state or the registry could not be."""
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
    else:
        _print_status_tables(status)
    if status.get("live") is None:
        print(f"motlens promote: live state unreadable: {status.get('live_error')}", file=sys.stderr)
    if "registry_error" in status:
        print(f"motlens promote: registry: {status['registry_error']}", file=sys.stderr)
    return EXIT_ERROR if status.get("live") is None or "registry_error" in status else EXIT_OK


def _overlay_row(overlay: dict[str, Any]) -> str:
    from rich.markup import escape

    if "error" in overlay:
        return f"[yellow]cannot render: {escape(overlay['error'])}[/]"
    if overlay["in_sync"]:
        return "in sync with the live rollout"
    changes = escape("; ".join(overlay["differences"]))
    return (
        f"[red]OUT OF SYNC[/]: `kubectl apply -k` would serve {escape(overlay['renders'])} (overlay → live: "
        f"{changes}); run `motlens promote sync-overlay` before applying it"
    )


def _print_status_tables(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from promotion.gates import drift_status

    console = Console()
    live = status.get("live")
    t = Table(title=f"mot-defects on {status['target']}", show_header=False)
    if status["aliases"] is None:
        t.add_row(
            "registry",
            f"[red]{escape(status['registry_error'])}[/]\n[yellow]aliases, versions, tags and any interrupted change "
            "unknown[/]",
        )
    else:
        t.add_row("registry aliases", ", ".join(f"{a} → v{v}" for a, v in sorted(status["aliases"].items())) or "none")
        if "registry_error" in status:  # failed part-way: what is shown was read
            unknown = (
                "registry tags vs aliases, live vs registry and any interrupted change unknown"
                if "tag_disagreements" not in status
                else "the canary's start unknown"
            )
            t.add_row("registry", f"[red]{escape(status['registry_error'])}[/]\n[yellow]{unknown}[/]")
    if live is None:
        t.add_row("live state", f"[red]unreadable: {status.get('live_error')}[/]")
    else:
        t.add_row("live state", escape(live["summary"]))
        t.add_row("storage URI (spec)", escape(str(live["storage_uri"])))
        served = live["storage_uri"] if live["canary_version"] is None else live["production_uri"]
        t.add_row("production URI", escape(str(served)))
        if status.get("pins_digest"):
            t.add_row("bundle sha256 (spec)", live["bundle_sha256"] or "[yellow]not pinned[/]")
        percent = "absent" if live["percent"] is None else f"{live['percent']}"
        if live["percent"] == 0 and live["canary_version"] is None:
            percent += (
                " (kept by a rollback: without it KServe routes to the latest ready revision, the rolled-back"
                " canary's, until the restored one is ready; `auto` removes it once the target reports so)"
            )
        t.add_row("canaryTrafficPercent", percent)
        t.add_row("traffic", escape(live["traffic"]) or "n/a")
        if overlay := status.get("overlay"):
            t.add_row(f"overlay {escape(overlay['dir'])}", _overlay_row(overlay))
        if "disagreements" in status:
            problems = status["disagreements"]
            t.add_row("live vs registry", "[green]agree[/]" if not problems else "[red]" + "\n".join(problems) + "[/]")
    if tags := status.get("tag_disagreements"):
        t.add_row("registry tags vs aliases", "[yellow]" + "\n".join(tags) + "[/]")
    if i := status.get("interrupted"):
        nxt = INTENT_OUTLOOK.get(i["next"], "the target could not be read")
        if "reverted" in i:
            nxt = f"{i['reverted']}; the next change that goes ahead records it as abandoned"
        t.add_row(
            "interrupted change",
            f"[yellow]{i['action']} by {i['actor']} at {i['at']} ({i['from']} → {i['to']}): its run stopped before "
            f"its audit; {nxt}[/]",
        )
    for d in status.get("drift", []):
        st = drift_status(d) or ("drift" if d.get("drift_detected") else "no_drift")
        colour = {"drift": "red", "no_drift": "green"}.get(st, "yellow")  # insufficient_data, error
        verdict = f"[{colour}]{st.replace('_', ' ')}[/]"
        t.add_row(f"drift v{d['model_version']} ({d['slot']})", f"{verdict} at {d['ts']} (n={d.get('n_current')})")
    for s in status.get("live_stats", []):
        t.add_row(
            f"live v{s['model_version']} ({s['slot']})",
            f"n={s['n']}, errors {float(s['error_rate']):.2%}, p99 {float(s['latency_p99_ms']):.1f} ms",
        )
    for r in status.get("live_requests", []):
        n, failed = int(r["requests"]), int(r["failed_requests"])
        t.add_row(
            f"live v{r['model_version']} requests",
            f"{n} requests ({int(r['items'])} rows), {failed} failed ({failed / max(n, 1):.2%}), "
            f"{int(r['miss_requests'])} with a cache miss (what the live gate tests)"
            + (
                f"; sampled: {float(r['requests_fraction']):.0%} of the window's requests"
                if float(r.get("requests_fraction", 1.0)) < 1.0
                else ""
            ),  # fmt: skip
        )
    if "live_stats_note" in status:
        t.add_row("live stats window", f"[yellow]{status['live_stats_note']}[/]")
    for e in status.get("events", []):
        marks = ", ".join(_event_marks(e))
        t.add_row(
            f"event {e['ts']}",
            escape(
                f"{e['action']} {e['from_version']}→{e['to_version']} by {e['actor']}"
                f"{f' ({marks})' if marks else ''} {e['reason']}".rstrip()
            ),  # a reason or actor is text, never markup
        )
    if "predlog_error" in status:
        t.add_row("prediction log", f"[yellow]unavailable: {escape(status['predlog_error'])}[/]")
    console.print(t)
    if status["versions"] is None:
        return
    v = Table(title="versions")
    for col in ("version", "aliases", "status", "last action", "metrics", "created"):
        v.add_column(col)
    for row in status["versions"]:
        v.add_row(
            row["version"],
            ",".join(row["aliases"]),
            row["status"],
            row["last_action"],
            " ".join(f"{k}={val:.3f}" for k, val in row["metrics"].items()),
            str(row["created_at"] or ""),
        )
    console.print(v)


def _event_marks(event: dict[str, Any]) -> list[str]:
    """What a ``promotion_events`` row did not do: "dry run" (it changed nothing, docs/promotion.md
    "Audit"), and "refused" (a gate or guard said no, exit 3), "partly done" (the target took the change,
    the registry did not follow) or "failed" (an error) when it did not succeed."""
    marks = ["dry run"] if event.get("dry_run") else []
    if not event.get("success"):
        try:
            details = json.loads(event.get("details") or "{}")
            refused, partial = bool(details.get("refused")), bool(details.get("partial"))
        except (TypeError, ValueError, AttributeError):  # not a JSON object: say only that it did not succeed
            refused = partial = False
        marks.append("refused" if refused else "partly done" if partial else "failed")
    return marks
