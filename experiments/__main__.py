"""``python -m experiments <benchmark> [flags]`` compares methods on a benchmark;
``python -m experiments <study> [--benchmark NAME] [flags]`` runs a study.

``python -m experiments <name> --help`` lists every flag with its real default;
``--tiny`` runs any of them in seconds on tiny data. Without arguments it lists the registered
benchmarks (``experiments/suites/__init__.py``) and studies (``experiments/studies/__init__.py``).
"""

from __future__ import annotations

import sys

PROG = "python -m experiments"


def _benchmark_arg(argv, default: str) -> str:
    for i, a in enumerate(argv):
        if a == "--benchmark" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--benchmark="):
            return a.split("=", 1)[1]
    return default


def main(argv=None) -> int:
    from experiments import cli, studies, suites

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[0] + "\n\nbenchmarks: " + ", ".join(suites.REGISTRY)
              + "\nstudies:    " + ", ".join(studies.STUDIES)
              + "\n\n`python -m experiments <name> --help` lists every flag with its default; --tiny runs it "
                "in seconds.")
        return 0 if argv else cli.EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name in suites.REGISTRY:
        study, bench_name, prog = "compare", name, f"{PROG} {name}"
    elif name in studies.STUDIES:
        mod = studies.module(name)
        study, prog = name, f"{PROG} {name}"
        bench_name = _benchmark_arg(rest, getattr(mod, "DEFAULT_BENCHMARK", "multimnist"))
    else:
        print(f"{PROG}: error: unknown benchmark or study {name!r}; benchmarks: "
              f"{', '.join(suites.REGISTRY)}; studies: {', '.join(studies.STUDIES)}", file=sys.stderr)
        return cli.EXIT_USAGE

    def body():
        mod = studies.module(study)
        bmod = suites.module(bench_name)
        study_defaults = getattr(mod, "DEFAULTS", {})
        defaults = cli.merge_defaults(cli.BASE_DEFAULTS, bmod.DEFAULTS[bench_name], study_defaults)
        defaults["out"] = f"runs/{bench_name}" if study == "compare" else f"runs/{study}/{bench_name}"
        tiny = cli.merge_defaults(suites.tiny_defaults(bench_name), getattr(mod, "TINY", {}))
        unused = tuple(getattr(bmod, "UNUSED_FLAGS", ())) + tuple(getattr(mod, "UNUSED_FLAGS", ()))
        parser = cli.make_parser(prog, mod.DESCRIPTION, defaults, tiny, epilog=getattr(mod, "USAGE", ""),
                                 omit=unused)
        if study != "compare":
            parser.add_argument("--benchmark", default=bench_name, choices=list(suites.REGISTRY),
                                help=f"the benchmark to run the study on (default: "
                                     f"{getattr(mod, 'DEFAULT_BENCHMARK', 'multimnist')})")
        bench_keys = suites.add_flags(parser, bench_name)
        cli.show_defaults(parser, study_defaults)  # a study's value for a benchmark's own flag
        keys = mod.add_flags(parser) if hasattr(mod, "add_flags") else ()
        o = cli.parse_options(parser, rest, benchmark=bench_name, study=study, defaults=defaults, tiny=tiny,
                              extra_keys=tuple(keys or ()) + bench_keys)
        mod.run(o, cli.command_line(prog, rest))

    return cli.run_main(prog, body)


if __name__ == "__main__":
    sys.exit(main())
