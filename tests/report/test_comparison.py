"""The report page of a ``relaylearn compare`` folder."""

from __future__ import annotations

import json

from relaylearn.report import build_report
from relaylearn.report.comparison import is_comparison


def _write_comparison(folder, strategy="relay", paired=None):
    folder.mkdir(parents=True)
    (folder / "matrices.json").write_text("{}")
    header = "strategy,config,runs,acc_mean,acc_std,bwt_mean,bwt_std,forgetting_mean,forgetting_std,external_dice_mean,external_dice_std,wall_s_mean,wall_s_std"
    (folder / "table.csv").write_text(
        f"{header}\n{strategy},demo/relay,6,0.75,0.02,-0.1,0.03,0.12,0.03,0.7,,300,10\nsequential,demo/sequential,6,0.48,0.04,-0.55,0.05,0.57,0.05,nan,nan,60,2\n"
    )
    (folder / "paired_test.json").write_text(json.dumps(paired))
    (folder / "table.md").write_text("# x\n\nStrategy values from the tuning in t:\n\n- demo/ewc: lambda_=100000.0 (tuned on demo/ewc)\n\n| table |\n")


def test_a_compare_folder_gets_its_table_paired_test_and_tuning_note(tmp_path):
    paired = {"relay": "relay", "other": "sequential", "runs": ["order0_seed0", "order1_seed0"],
              "acc": {"mean_difference": 0.27, "std_difference": 0.01, "wilcoxon_p": 0.5, "t_test_p": 0.02},
              "forgetting": {"mean_difference": -0.45, "std_difference": 0.02, "wilcoxon_p": 0.5, "t_test_p": 0.01}}  # fmt: skip
    _write_comparison(tmp_path / "cmp", paired=paired)
    assert is_comparison(tmp_path / "cmp") and not is_comparison(tmp_path)
    page = build_report(tmp_path / "cmp")
    assert "<td>relay</td>" in page and "0.750 ± 0.020" in page and "-0.100 ± 0.030" in page
    assert '<td class="num best">0.750 ± 0.020</td>' in page and '<td class="num best">0.120 ± 0.030</td>' in page  # best ACC, least forgetting
    assert "+0.270 ± 0.010" in page and "0.02" in page and "lambda_=100000.0 (tuned on demo/ewc)" in page
    assert '<td class="num">–</td>' in page  # an external Dice of nan is shown as missing


def test_pooled_training_is_not_marked_best(tmp_path):
    _write_comparison(tmp_path / "cmp")
    table = tmp_path / "cmp" / "table.csv"
    table.write_text(table.read_text() + "joint,demo/joint,6,0.9,0.02,0,0,0,0,0.7,0.1,50,1\n")
    page = build_report(tmp_path / "cmp")
    assert '<td class="num best">0.750 ± 0.020</td>' in page and '<td class="num">0.900 ± 0.020</td>' in page


def test_names_from_the_files_are_escaped(tmp_path):
    _write_comparison(tmp_path / "cmp", strategy="<script>alert(1)</script>")
    page = build_report(tmp_path / "cmp")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page and "No paired test" in page


def test_a_broken_comparison_file_is_one_line_naming_it_and_exit_2(tmp_path, capsys):
    from relaylearn.cli import main

    folder = tmp_path / "cmp"
    _write_comparison(folder, paired={"relay": "relay", "runs": ["a"]})
    for name, content in (("paired_test.json", b'{"relay": "rel'), ("paired_test.json", b"[1, 2]"), ("table.csv", b"strategy,config\n\xff\xfe,x\n")):
        good = (folder / name).read_bytes()
        (folder / name).write_bytes(content)
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder / name}: " in err and "internal error" not in err and len(err.strip().splitlines()) == 1, err
        (folder / name).write_bytes(good)
    assert not (folder / "report.html").exists(), "nothing half-written"


def test_values_that_are_not_numbers_are_a_dash(tmp_path):
    not_numbers = {"mean_difference": "big", "std_difference": [1], "wilcoxon_p": "0.5x", "t_test_p": True}
    _write_comparison(tmp_path / "cmp", paired={"relay": "relay", "other": "sequential", "runs": 3, "acc": not_numbers, "forgetting": "x"})
    table = tmp_path / "cmp" / "table.csv"
    table.write_text(table.read_text().replace("0.75,0.02", "high,0.02") + "short,row\n")
    paired = build_report(tmp_path / "cmp").split('<section id="paired">')[1]
    assert paired.count('<td class="num">–</td>') == 6 and "over 0 run(s)" in paired
