"""``featkd kernel CONFIG --n N --out DIR``: does matching K_nm (KDA) bring the full kernel matrices together?

On N training examples (eval view, a seeded subset) it computes, with the config's teacher and student (or
``--student-checkpoint``), the teacher's and student's full N x N kernel matrices, their difference
``||K_t - K_s||_F``, each network's Nyström reconstruction error with the landmarks of the config's KDA
options (``method: {name: kda, ...}``; KDA's defaults for other methods), the partial difference
``||K_nm^t - K_nm^s||_F``, and the KDA loss on those examples (and under ``centered`` the same numbers
after subtracting each network's mean feature, which otherwise dominates the norms); writes
``DIR/kernel.json`` and ``DIR/kernel.png``.

Landmarks: ``--landmarks eval`` (default) computes them as the strategy would, from the N examples'
eval-mode features (class means, k-means cluster means, or the fixed random examples); ``--landmarks stored``
takes the centres saved in a training checkpoint of a KDA run (``--student-checkpoint RUN/last.pt``).
"""

from __future__ import annotations

import argparse

HELP = "KDA diagnostics: full vs partial (landmark) kernel differences and Nyström errors, as JSON + plot"

#: N x N float64 matrices alive at once while the diagnostics run (K_t, K_s, two Nyström approximations,
#: a difference): with --memory-budget-gib the command refuses an N that would not fit
FULL_MATRICES = 5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (teacher, student, data; KDA options from its method section)")
    p.add_argument("--n", type=int, required=True, help="number of training examples (seeded subset)")
    p.add_argument("--out", required=True, help="folder for kernel.json and kernel.png")
    p.add_argument("--student-checkpoint", help="student weights: a run folder, last.pt/best.pt or a state_dict "
                                                "(default: the config's student.checkpoint)")
    p.add_argument("--landmarks", choices=["eval", "stored"], default="eval",
                   help="eval: from the N examples' eval-mode features (default); stored: the centres in a "
                        "KDA training checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.kernel=cosine (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the N-example subset (default 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-budget-gib", type=float, default=2.0,
                   help=f"refuse N if {FULL_MATRICES} N x N float64 matrices exceed this (default 2)")
    p.add_argument("--plot-examples", type=int, default=300, help="examples shown in the heat maps (default 300)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    p.add_argument("--force", action="store_true", help="overwrite an existing kernel.json / kernel.png")


def _student_path(arg: str):
    from pathlib import Path

    from featkd.errors import FeatkdError

    path = Path(arg)
    if path.is_dir():
        for name in ("student.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FeatkdError(f"--student-checkpoint {arg}: no student.pt or last.pt in this folder")
    if not path.is_file():
        raise FeatkdError(f"--student-checkpoint {arg}: no such file or folder")
    return path


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from featkd.config import load_config
    from featkd.engine import checkpoint as ckpt
    from featkd.engine.build import build_run
    from featkd.errors import ConfigError, FeatkdError
    from featkd.methods.kda.distiller import KDA, kda_loss
    from featkd.methods.kda.landmarks import kernel_diagnostics
    from featkd.plotting import require_pyplot

    if args.n < 2:
        raise FeatkdError(f"--n {args.n}: need at least 2 examples")
    need = FULL_MATRICES * 8 * args.n**2
    if need > args.memory_budget_gib * 2**30:
        raise FeatkdError(f"--n {args.n}: the full N x N matrices need about {need / 2**30:.1f} GiB, more than "
                          f"--memory-budget-gib {args.memory_budget_gib:g}; use a smaller --n")
    out = Path(args.out)
    targets = [out / "kernel.json"] + ([] if args.no_plot else [out / "kernel.png"])
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise FeatkdError(f"{existing[0]} exists; pass --force to overwrite it or choose another --out")
    if not args.no_plot:
        plt = require_pyplot("the kernel plots", "pass --no-plot")

    overrides = [*args.overrides, f"train.device={args.device}", f"train.seed={args.seed}"]
    cfg = load_config(args.config, overrides)
    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise ConfigError("teacher: the kernel diagnostics need a trained teacher (teacher.checkpoint)")
    if cfg.method_name != "kda":  # KDA's defaults for the landmarks and the kernel
        cfg = dataclasses.replace(cfg, method={"name": "kda"})
    student_path = _student_path(args.student_checkpoint) if args.student_checkpoint else None
    if student_path is None and not cfg.student.checkpoint:
        print("note: no --student-checkpoint and no student.checkpoint: using an untrained student")
    run = build_run(cfg, student_checkpoint=student_path)
    distiller, data, device, options = run.distiller, run.data, run.device, run.options
    assert isinstance(distiller, KDA)
    run.student.eval()
    ctx = run.context()

    loader = data.train_eval_loader(cfg.data.eval_batch_size, device=device, limit=args.n, seed=args.seed)
    feats_t, feats_s, labels = [], [], []
    for _x, y, t_out, s_out in ctx.iter_features(loader):
        feats_t.append(distiller.point_vectors(t_out, distiller.t_point))
        feats_s.append(distiller.point_vectors(s_out, distiller.s_point))
        labels.append(y)
    f_t, f_s, y = torch.cat(feats_t), torch.cat(feats_s), torch.cat(labels)

    if args.landmarks == "stored":
        state = ckpt.load_file(student_path) if student_path is not None else None
        if not (ckpt.is_training_checkpoint(state) and "t_centres" in state.get("distiller", {})):
            raise FeatkdError("--landmarks stored needs --student-checkpoint pointing to a KDA run's last.pt/best.pt")
        try:
            distiller.load_state_dict(state["distiller"])
        except RuntimeError as exc:
            raise FeatkdError(f"{student_path}: its KDA state does not fit this config: {str(exc)[:200]}") from None
        if not bool(distiller.has_centre.any()):
            raise FeatkdError(f"{student_path}: the checkpoint holds no landmark centres yet")
    else:
        distiller.prepare(ctx)
        if options.landmarks == "random":
            distiller.random_centres(ctx)
        else:  # class means / cluster means of the N examples themselves
            distiller.add_examples(f_t, f_s, y)
            distiller.centres_from_sums(ctx, f"the {len(y)} examples")
    has = distiller.has_centre
    c_t, c_s = distiller.t_centres[has], distiller.s_centres[has]
    result = kernel_diagnostics(f_t, f_s, c_t, c_s, options.kernel)
    # the same after subtracting each network's mean feature of the N examples from features and landmarks:
    # ReLU features share a large mean component, which dominates uncentred Frobenius norms
    mu_t, mu_s = f_t.mean(0, keepdim=True), f_s.mean(0, keepdim=True)
    result["centered"] = kernel_diagnostics(f_t - mu_t, f_s - mu_s, c_t - mu_t, c_s - mu_s, options.kernel)
    with torch.no_grad():
        k_s, k_t = distiller.kernels(f_s, f_t)
        result["kda_loss_official"] = float(kda_loss(k_s, k_t, "official", options.smooth_l1_beta))
        result["kda_loss_normalized"] = float(kda_loss(k_s, k_t, "normalized", options.smooth_l1_beta))
    report = {
        "config": str(args.config), "teacher": cfg.teacher.model, "teacher_checkpoint": cfg.teacher.checkpoint,
        "student": cfg.student.model,
        "student_checkpoint": str(student_path) if student_path else cfg.student.checkpoint,
        "dataset": cfg.data.dataset, "n": len(y), "seed": args.seed, "landmarks": options.landmarks,
        "landmark_source": args.landmarks, "m": int(has.sum()), "kernel": options.kernel,
        "teacher_point": distiller.t_point, "student_point": distiller.s_point,
        "teacher_dim": f_t.shape[1], "student_dim": f_s.shape[1], **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in report.items()
                      if k != "centered"}, indent=2))
    if not args.no_plot:
        _plot(plt, f_t, f_s, y, c_t, c_s, options.kernel, report, args.plot_examples, out / "kernel.png")
    print(f"wrote {out / 'kernel.json'}" + ("" if args.no_plot else f" and {out / 'kernel.png'}"))
    return 0


def _plot(plt, f_t, f_s, y, c_t, c_s, kind, report, shown, path) -> None:
    """Heat maps of K_t, K_s and |K_t - K_s| (each scaled by its own max |value|) on examples sorted by label,
    the partial matrices, and the relative numbers as bars."""
    import torch

    from featkd.methods.kda.landmarks import kernel, rbf_gamma

    order = torch.argsort(y[:shown], stable=True)
    a, b = f_t[:shown][order].double(), f_s[:shown][order].double()
    g_t = rbf_gamma(f_t.double(), c_t.double()) if kind == "rbf" else None
    g_s = rbf_gamma(f_s.double(), c_s.double()) if kind == "rbf" else None
    k_t, k_s = kernel(a, a, kind, g_t), kernel(b, b, kind, g_s)
    k_t, k_s = k_t / k_t.abs().max(), k_s / k_s.abs().max()
    knm_t, knm_s = kernel(a, c_t.double(), kind, g_t), kernel(b, c_s.double(), kind, g_s)
    fig, axes = plt.subplots(2, 3, figsize=(14, 9))
    panels = [(k_t, "K_t (teacher, / max)"), (k_s, "K_s (student, / max)"), ((k_t - k_s).abs(), "|K_t - K_s| scaled"),
              (knm_t / knm_t.abs().max(), "K_nm teacher"), (knm_s / knm_s.abs().max(), "K_nm student")]
    for ax, (mat, title) in zip(axes.flat, panels):
        im = ax.imshow(mat.cpu().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    keys = ["full_diff_rel", "partial_diff_rel", "nystrom_error_teacher_rel", "nystrom_error_student_rel",
            "full_diff_scale_free", "partial_diff_scale_free"]
    ax = axes.flat[5]
    ax.barh(keys, [report[k] for k in keys])
    ax.set_title("relative Frobenius norms")
    fig.suptitle(f"{report['teacher']} -> {report['student']} on {report['dataset']}: N={report['n']}, "
                 f"m={report['m']} {report['landmarks']} landmarks, {kind} kernel")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
