"""The docs are in the repository and in step with the code."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_keys_page_is_generated_from_the_current_schema():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_recipe_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_readme_and_docs_point_only_inside_the_repository():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "../shared" not in text and "ICNN_SPEC" not in text, page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_tool_parses_its_command_line_before_it_works():
    """``tools/<name>.py --help`` must print help, not run a benchmark and overwrite its results:
    every tool has a ``__main__`` guard and an ``argparse`` parser that ``main()`` calls first."""
    import ast

    scripts = [p for p in sorted((ROOT / "tools").glob("*.py")) if not p.name.startswith("_")]
    assert len(scripts) > 10
    for path in scripts:
        tree = ast.parse(path.read_text())
        guard = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert guard, f"{path.name}: no `if __name__ == '__main__'` guard"
        top_calls = [
            n
            for n in tree.body
            if isinstance(n, ast.Expr)
            and isinstance(n.value, ast.Call)
            and ast.unparse(n.value.func) != "matplotlib.use"  # a backend choice, not work
        ]
        assert not top_calls, f"{path.name}: work at import time: {ast.unparse(top_calls[0])}"
        main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
        assert main is not None, f"{path.name}: no main()"
        assert "parse_args" in ast.unparse(main), f"{path.name}: main() does not parse its command line"
