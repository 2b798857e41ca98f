#!/usr/bin/env python3
"""Regenerate the README's Results section from results/*.md (each file names the command that produced it).

    python scripts/update_readme.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md: markers {START} / {END} not found")
    parts = []
    # Method tables (grids with a cells/ cache) first, then FP scores, then ablations, benchmarks and costs.
    def order(md: Path) -> tuple:
        return (not (md.parent / md.stem / "cells").is_dir(), md.stem != "fp_scores", md.name)

    for md in sorted((ROOT / "results").glob("*.md"), key=order):
        body = md.read_text().strip().splitlines()
        title = body[0].lstrip("# ").strip() if body and body[0].startswith("#") else md.stem
        # The file's own headings sit below its "###" title.
        lines = [f"###{line}" if line.startswith("#") else line for line in body[1:]]
        parts.append(f"### {title}\n\n_From `results/{md.name}`._\n\n" + "\n".join(lines).strip())
    section = "\n\n".join(parts) if parts else "No results yet."
    head, rest = text.split(START, 1)
    readme.write_text(f"{head}{START}\n{section}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
