"""A non-editable install (`pip install .`, a wheel) carries every data file zsd reads."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from zsd.recipes import RECIPES_DIR, load_recipe, recipe_names

ROOT = Path(__file__).parent.parent


def test_the_wheel_holds_the_package_data_and_zsd_prompts_runs_from_it(tmp_path):
    # Build from a copy, so no build/ folder (with stale files of earlier builds) lands in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "zsd", src / "zsd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("zsd-*.whl")

    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "zsd" / "data").rglob("*") if p.is_file()}
    student = "zsd/data/students/agnostic_lite0_mobilenetv3_small_050/student"
    assert {f"zsd/data/recipes/{n}.json" for n in ("pets", "flowers", "imagenet100")} | \
        {f"{student}.safetensors", f"{student}.json", "zsd/data/pets37/imagenet_classes.json"} <= shipped
    names = set(zipfile.ZipFile(wheel).namelist())
    assert shipped <= names
    # zsd/data is data only: no module of that name shadows it or is shadowed by it
    assert "zsd/loader.py" in names and not any(n.startswith("zsd/data") and n.endswith(".py") for n in names)

    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    recipe = load_recipe("pets")
    options = {c: {d.key: [f"{d.key} {i}" for i in range(3)] for d in recipe.dimensions} for c in recipe.classes}
    (tmp_path / "options.json").write_text(json.dumps({"classes": options}))
    run = tmp_path / "elsewhere"  # not the checkout: only the installed copy can be imported
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "zsd", "prompts", "pets", "--options", str(tmp_path / "options.json"),
                          "--out", "p.jsonl"], cwd=run, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    where = subprocess.run([sys.executable, "-c", "import zsd.recipes as r; print(r.RECIPES_DIR)"], cwd=run,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site) and Path(where) != RECIPES_DIR
    prompts = [json.loads(line) for line in (run / "p.jsonl").read_text().splitlines()]
    assert {p["class"] for p in prompts} == set(recipe.classes)
    assert sorted(recipe_names()) == sorted(p.stem for p in Path(where).glob("*.json"))
    # the quickstart's photos and class mapping come from the installed copy too
    probe = ("from zsd.quickstart import DATA; print(DATA); "
             "print(sum(1 for p in DATA.rglob('*') if p.suffix.lower() in ('.jpg', '.jpeg', '.png')))")
    data, photos = subprocess.run([sys.executable, "-c", probe], cwd=run, env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    assert Path(data).is_relative_to(site) and (Path(data) / "imagenet_classes.json").is_file()
    assert int(photos) == sum(1 for p in (ROOT / "zsd" / "data" / "pets37").rglob("*")
                              if p.suffix.lower() in (".jpg", ".jpeg", ".png")) > 300
    # and the quickstart's first-stage student, loaded from there
    probe = ("from zsd.quickstart import AGNOSTIC_STUDENT as s; from zsd.student import load_student; "
             "m, c = load_student(s); print(s, c['student'], sum(p.numel() for p in m.parameters()))")
    where, name, params = subprocess.run([sys.executable, "-c", probe], cwd=run, env=env, capture_output=True,
                                         text=True, check=True).stdout.split()
    assert Path(where).is_relative_to(site) and name == "mobilenetv3_small_050" and int(params) > 10**5
