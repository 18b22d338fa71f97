"""experiments/sweep_table.py: mean ± std over seeds from a multirun directory."""

import json
import statistics

import yaml
from experiments import sweep_table


def _job(root, n, overrides, miou):
    d = root / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "metrics.json").write_text(json.dumps({"test/mIoU": miou, "test/GmIoU": miou / 2}))


def test_over_seed_gives_mean_and_sample_std_per_group(tmp_path):
    values = {"gmm": [50.0, 54.0, 58.5], "cosine": [40.0, 41.0]}
    n = 0
    for guidance, vals in values.items():
        for seed, v in enumerate(vals):
            _job(tmp_path, n, [f"seed={seed}", f"model.guidance={guidance}"], v)
            n += 1
    rows = sweep_table.aggregate(sweep_table.load_jobs(tmp_path), "seed")
    by = {r["key"]["model.guidance"]: r for r in rows}
    assert set(by) == {"gmm", "cosine"} and by["gmm"]["n"] == 3 and by["cosine"]["n"] == 2
    for g, vals in values.items():
        mean, std = by[g]["test/mIoU"]
        assert abs(mean - statistics.mean(vals)) < 1e-9
        assert abs(std - statistics.stdev(vals)) < 1e-9
    sweep_table.main([str(tmp_path), "--over", "seed", "--out", str(tmp_path / "t")])
    table = (tmp_path / "t" / "sweep_table.md").read_text()
    assert "| model.guidance | n (seed) |" in table
    assert f"| gmm | 3 | 54.17 ± {statistics.stdev(values['gmm']):.2f} |" in table
