"""How the package is shaped, measured from the code: what a student must read, and which way imports run.

    python bench/structure.py            # static figures, then one pretraining and one QLoRA step of train.py
    python bench/structure.py --static   # static figures only (a second)

Static (read from the source, nothing imported):
    modules, import cycles    every `import nanoft...` / `from nanoft... import ...`, inside functions too
    method-name compares      `finetune ==`, `finetune in (...)` and the like in nanoft/, train.py, sample.py
Run (train.py executed in this process for 2 steps, in a temporary out_dir):
    imported                  nanoft modules in sys.modules after the run, and their lines
    followed                  the files in which code ran during the second step, and their lines: what a
                              student stepping through one step in a debugger would visit
"""
from __future__ import annotations

import ast
import os
import re
import runpy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARE = re.compile(r"""finetune\s*(==|!=|\bin\b|\bnot in\b)|get\(["']finetune["']\)\s*(==|!=|\bin\b)""")


def module_files() -> dict[str, Path]:
    """{'nanoft.model.gpt': path, ...} for every module of the package (kernels/ installs as nanoft.kernels)."""
    found = {}
    for base, prefix in ((ROOT / "nanoft", "nanoft"), (ROOT / "kernels", "nanoft.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body (lazy imports count: they run too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    for script in ("train.py", "sample.py"):
        graph[script] = imports_of(ROOT / script, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def method_compares() -> list[str]:
    files = [*(ROOT / "nanoft").rglob("*.py"), ROOT / "train.py", ROOT / "sample.py"]
    hits = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if COMPARE.search(code):
                hits.append(f"{path.relative_to(ROOT)}:{i}")
    return hits


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def run_step(argv: list[str]) -> tuple[list[Path], list[Path]]:
    """(files imported, files whose code ran in the second step) for `python train.py *argv` in-process."""
    followed: set[str] = set()
    state = {"step": 0}
    nanoft_dirs = (str(ROOT / "nanoft"), str(ROOT / "kernels"), str(ROOT / "train.py"))

    def profile(frame, event, arg):  # the loop's second step: from the 2nd to the 3rd call of warmup_cosine
        if event != "call":
            return
        if frame.f_code.co_name == "warmup_cosine":
            state["step"] += 1
        if state["step"] == 2 and frame.f_code.co_filename.startswith(nanoft_dirs):
            followed.add(frame.f_code.co_filename)

    old_argv = sys.argv
    sys.argv = ["train.py", *argv]
    sys.setprofile(profile)
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.setprofile(None)
        sys.argv = old_argv
    imported = [Path(m.__file__) for name, m in sys.modules.items()
                if name.startswith("nanoft") and getattr(m, "__file__", None)]
    return sorted(imported), sorted(Path(f) for f in followed)


def report_run(title: str, imported: list[Path], followed: list[Path]) -> None:
    print(f"{title}: imports {len(imported)} modules, {sum(map(lines, imported)):,} lines; "
          f"one step runs code in {len(followed)} files, {sum(map(lines, followed)):,} lines")
    for path in followed:
        print(f"    {path.relative_to(ROOT)} ({lines(path)})")


def main() -> None:
    graph = import_graph()
    modules = module_files()
    found = cycles(graph)
    compares = method_compares()
    print(f"package: {len(modules)} modules, {sum(map(lines, modules.values())):,} lines")
    print(f"import cycles: {len(found)}" + "".join(f"\n    {' <-> '.join(c)}" for c in found))
    print(f"method-name string compares: {len(compares)} in {len({h.split(':')[0] for h in compares})} files")
    if "--static" in sys.argv:
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--max_iters=3", "--eval_interval=100", "--log_interval=1", "--save_interval=100", "--warmup_iters=0",
                  "--compile=False"]
        imported, followed = run_step(["configs/tiny.py", f"--out_dir={tmp}/base", *common])
        report_run("pretraining (configs/tiny.py)", imported, followed)
        for name in [m for m in sys.modules if m.startswith("nanoft")]:
            del sys.modules[name]  # the QLoRA run counts its own imports
        imported, followed = run_step(["configs/qlora.py", f"--init_from={tmp}/base", f"--out_dir={tmp}/qlora", *common])
        report_run("QLoRA (configs/qlora.py)", imported, followed)


if __name__ == "__main__":
    main()
