"""The paper's rows as configs (conf/ablation/) and their tables (cgmgm.sweeps)."""

import json
import statistics

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cgmgm import tables
from cgmgm.config import config_dir

# Table 5 of the paper: (IMG, IMR, C&Q) -> mIoU; Table 1: guidance -> (GmIoU, FmIoU)
TABLE5 = {
    "bam": (False, False, False, 67.81),
    "cq": (False, False, True, 66.95),
    "img_cq": (True, False, True, 68.27),
    "img_imr": (True, True, False, 68.58),
    "cgmgm": (True, True, True, 69.85),
}


def _compose(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("row", list(TABLE5))
def test_each_row_is_a_model_configuration_with_the_papers_number(row):
    cfg = _compose(f"ablation={row}")
    img, imr, cq, miou = TABLE5[row]
    assert (cfg.model.img, cfg.model.imr) == (img, imr)
    assert ("posterior" in cfg.model.guidance) == cq
    assert cfg.paper.table5.mIoU == miou and cfg.paper.row == row
    if not cq:  # without C&Q the guidance is BAM's prior or IMGR's initial mask
        assert list(cfg.model.guidance) == (["initial_mask"] if img else ["cosine"])


def test_defaults_are_the_full_model_and_a_users_override_wins():
    default = _compose().model
    full = _compose("ablation=cgmgm").model
    assert OmegaConf.to_container(default) == OmegaConf.to_container(full)
    cfg = _compose("ablation=bam", "model.guidance=[cosine,posterior]")
    assert list(cfg.model.guidance) == ["cosine", "posterior"] and cfg.model.img is False


@pytest.mark.parametrize("name,table", [("table5", 5), ("table1_guidance", 1)])
def test_table_experiments_sweep_rows_and_seeds_and_print_the_table(name, table):
    cfg = _compose(f"experiment={name}", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    rows = "bam,cq,img_cq,img_imr,cgmgm" if table == 5 else "bam,cgmgm"
    assert cfg.hydra.sweeper.params["ablation"] == rows
    assert cfg.hydra.sweeper.params["seed"] == "0,1,2"
    assert cfg.hydra.callbacks.paper_table.table == f"table{table}"


def _job(root, n, row, seed, metrics, ensemble=True, **model):
    cfg = _compose(f"ablation={row}", f"seed={seed}", *(f"model.{k}={v}" for k, v in model.items()))
    d = root / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"ablation={row}", f"seed={seed}"])
    )
    plain = OmegaConf.to_container(cfg, resolve=False)
    (d / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({k: plain[k] for k in ("model", "paper", "seed")})
    )
    record = {"dataset": "synthetic", "fold": 0, "shot": 1, "backbone": "efficientnet_lite0"}
    record["ensemble"] = ensemble
    (d / "metrics.json").write_text(json.dumps({**record, **metrics}))


def test_table5_in_the_papers_layout_with_mean_and_std_over_seeds(tmp_path, capsys):
    final = {"bam": [30.0, 32.0, 34.0], "cq": [20.0, 21.0, 25.0], "img_cq": [31.0, 33.5, 30.0],
             "img_imr": [40.0, 41.0, 39.0], "cgmgm": [36.0, 35.0, 37.0]}  # fmt: skip
    n = 0
    for row in reversed(list(TABLE5)):  # the table sorts them in the paper's order
        for seed, v in enumerate(final[row]):
            metrics = {"test/mIoU": v, "test/meta/mIoU": v - 1, "test/GmIoU": v / 2}
            if row != "bam":
                metrics["test/GmIoU/initial_mask"] = 17.0
            _job(tmp_path, n, row, seed, metrics)
            n += 1
    text = tables.write_table("table5", [tmp_path])
    assert (tmp_path / "table5.md").read_text().strip() == text.strip()
    assert tables.write_table("table5", [tmp_path]) == text  # printed again: the first is kept
    assert (tmp_path / "table5.earlier-1.md").read_text().strip() == text.strip()
    assert text in capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(lines) == 5
    for line, (row, (img, imr, cq, paper)) in zip(lines, TABLE5.items(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == ["✓" if img else "", "✓" if imr else "", "✓" if cq else ""]
        assert cells[3] == f"{paper:.2f}"
        vals = final[row]
        assert cells[4] == f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
        meta = [v - 1 for v in vals]
        assert cells[5] == f"{statistics.mean(meta):.2f} ± {statistics.stdev(meta):.2f}"
        assert cells[-1] == "3"
        assert cells[9] == ("-" if row == "bam" else "17.00 ± 0.00")


def test_a_modified_row_does_not_borrow_the_papers_number(tmp_path):
    _job(tmp_path, 0, "bam", 0, {"test/mIoU": 30.0, "test/GmIoU": 10.0})
    _job(tmp_path, 1, "cgmgm", 0, {"test/mIoU": 31.0, "test/GmIoU": 11.0}, img="false", imr="false")
    _job(tmp_path, 2, "img_imr", 0, {"test/mIoU": 32.0}, guidance="[initial_mask,cosine]")
    _job(tmp_path, 3, "cq", 0, {"test/mIoU": 33.0}, ensemble=False)  # no stage 1
    text = tables.write_table("table1", [tmp_path])
    assert "| Prototype with CS (BAM) | 24.11 | 67.81 | 10.00 | 30.00 | 1 |" in text
    assert "| CGMGM (Ours) (not the row) | - | - | 11.00 | 31.00 | 1 |" in text
    table5 = tables.write_table("table5", [tmp_path])
    assert "67.81" in table5
    for paper in ("69.85", "68.58", "66.95"):
        assert paper not in table5
    assert table5.count("(not the row)") == 3


def test_another_varying_override_makes_labelled_rows(tmp_path):
    for n, (fold, v) in enumerate([(0, 30.0), (0, 32.0), (1, 50.0), (1, 54.0)]):
        _job(tmp_path, n, "bam", n % 2, {"test/mIoU": v})
        cfg = tmp_path / str(n) / ".hydra" / "overrides.yaml"
        cfg.write_text(yaml.safe_dump(["ablation=bam", f"seed={n % 2}", f"fold={fold}"]))
    text = tables.write_table("table5", [tmp_path])
    assert "| fold=0: " in text and "| fold=1: " in text
    assert f"31.00 ± {statistics.stdev([30.0, 32.0]):.2f}" in text
    assert f"52.00 ± {statistics.stdev([50.0, 54.0]):.2f}" in text


def test_a_job_without_a_row_is_an_error(tmp_path):
    d = tmp_path / "0"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": {}, "seed": 0}))
    (d / "metrics.json").write_text(json.dumps({"test/mIoU": 1.0}))
    with pytest.raises(ValueError, match="ablation="):
        tables.write_table("table5", [tmp_path])
