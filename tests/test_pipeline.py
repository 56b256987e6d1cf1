import logging

import pytest
import torch
import torch.fx as fx
from torch import nn

import qcompile
from qcompile.errors import PassError, PipelineError
from qcompile.pipeline import PassSpec, available_passes, parse_pipeline


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@qcompile.register_pass("test-negate-output")
def negate_output(gm: fx.GraphModule, ctx):
    """Append a negation before the output; records the config it saw."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    with gm.graph.inserting_before(output):
        negated = gm.graph.call_function(torch.neg, (value,))
    output.args = (negated,)
    ctx.note(f"bits={ctx.option('bits')} scale={ctx.option('scale', 1)}")
    return gm


@qcompile.register_pass("test-raises")
def raises(gm, ctx):
    raise RuntimeError("no match for pattern")


@qcompile.register_pass("test-wrong-shape")
def wrong_shape(gm, ctx):
    gm.fc2 = nn.Linear(3, 2)
    return gm


@qcompile.register_pass("test-returns-none")
def returns_none(gm, ctx):
    return None


def test_user_pass_joins_builtins_by_name_and_sees_config():
    model = TwoLayers().eval()
    x = torch.randn(3, 4)
    gm = qcompile.trace(model, (x,))
    ctx = qcompile.PassContext()
    out = qcompile.PassManager(["canonicalize", "test-negate-output"]).run(
        gm, example_inputs=(x,), ctx=ctx, bits=3
    )
    torch.testing.assert_close(out(x), -model(x))
    assert [r.name for r in ctx.records] == ["canonicalize", "test-negate-output"]
    assert ctx.records[1].notes == ["bits=3 scale=1"]
    assert ctx.records[1].nodes_after == ctx.records[1].nodes_before + 1
    # the input graph is left alone
    torch.testing.assert_close(gm(x), model(x))


def test_spec_string_options_reach_the_pass():
    gm = qcompile.trace(TwoLayers())
    ctx = qcompile.PassContext()
    qcompile.PassManager("test-negate-output{scale=0.5, bits=4}").run(gm, ctx=ctx, bits=2)
    assert ctx.records[0].notes == ["bits=4 scale=0.5"]


def test_parse_pipeline_expands_presets_and_types_values():
    steps = parse_pipeline("float, test-negate-output{a=1,b=2.5,c=true,d=qil}")
    assert [s.name for s in steps] == ["canonicalize", "fold-bn", "test-negate-output"]
    assert steps[-1].options == {"a": 1, "b": 2.5, "c": True, "d": "qil"}
    assert parse_pipeline([PassSpec("canonicalize"), "fold-bn{mode=qat}"])[1].options == {
        "mode": "qat"
    }


def test_unknown_pass_lists_known_ones():
    with pytest.raises(PipelineError) as info:
        qcompile.PassManager(["canonicalize", "no-such-pass"])
    assert "no-such-pass" in str(info.value)
    for name in available_passes():
        assert name in str(info.value)


@pytest.mark.parametrize("spec", ["fold-bn{mode", "canonicalize,,", "fold-bn{novalue}", ""])
def test_malformed_specs_are_rejected(spec):
    with pytest.raises(PipelineError):
        parse_pipeline(spec)


def test_duplicate_registration_is_rejected():
    with pytest.raises(PipelineError, match="already registered"):
        qcompile.register_pass("canonicalize")(lambda gm, ctx: gm)
    with pytest.raises(PipelineError, match="not valid"):
        qcompile.register_pass("Bad Name")


def test_pass_leaving_graph_that_does_not_run_names_pass_and_predecessors():
    x = torch.randn(2, 4)
    gm = qcompile.trace(TwoLayers(), (x,))
    with pytest.raises(PassError) as info:
        qcompile.PassManager(["canonicalize", "test-wrong-shape"]).run(gm, example_inputs=(x,))
    message = str(info.value)
    assert "'test-wrong-shape' (after canonicalize)" in message
    assert "no longer runs" in message


def test_pass_errors_are_wrapped_with_the_pass_name():
    gm = qcompile.trace(TwoLayers())
    with pytest.raises(PassError, match="'test-raises' \\(first pass\\) failed: RuntimeError: no"):
        qcompile.PassManager(["test-raises"]).run(gm)
    with pytest.raises(PassError, match="returned NoneType"):
        qcompile.PassManager(["test-returns-none"]).run(gm)


def test_check_leaves_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).train()
    x = torch.randn(4, 1, 3, 3)
    gm = qcompile.trace(model, (x,))
    before = gm.get_submodule("1").running_mean.clone()
    out = qcompile.PassManager(["test-negate-output"]).run(gm, example_inputs=(x,))
    assert torch.equal(out.get_submodule("1").running_mean, before)
    assert out.training and out.get_submodule("1").training


def test_print_after_and_dump_dir(tmp_path, caplog):
    printed = []
    gm = qcompile.trace(TwoLayers())
    with caplog.at_level(logging.INFO, logger="qcompile.pipeline"):
        qcompile.PassManager(
            ["canonicalize", "test-negate-output"],
            print_after=["test-negate-output"],
            dump_dir=tmp_path,
            printer=printed.append,
        ).run(gm)
    assert len(printed) == 1 and "torch.neg" in printed[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00-canonicalize.py", "01-test-negate-output.py"
    ]
    assert "pass canonicalize" in caplog.text and "pass test-negate-output" in caplog.text
    with pytest.raises(PipelineError, match="does not run"):
        qcompile.PassManager(["canonicalize"], print_after=["fold-bn"])
