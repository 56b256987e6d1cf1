import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from real_data import digits
from torch import nn

import qcompile
from batch_norms import with_batch_statistics
from qcompile.errors import ConfigError
from qcompile.models import SmallCNN
from qcompile.passes.quantize_boundaries import BOUNDARY_QUANTIZERS
from qcompile.quant import Quantizer, available_methods

WITHOUT = ["canonicalize", "fold-bn{mode=qat}", "assign-bits", "insert-quantizers"]
POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


class Branchy(nn.Module):
    """A residual add, an add that broadcasts a parameter, a channel concatenation of unequal
    widths, a pool module and a functional pool: small enough to quantize with every method in a
    moment."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.stem(x)) + self.offset
        x = x + self.body(x)
        x = torch.cat([self.left(x), F.relu(self.right(x))], dim=1)
        return self.head(F.adaptive_avg_pool2d(self.pool(x), 1).flatten(1))


def quantized(model, x, passes=None, ctx=None, **config):
    config.setdefault("calib_data", [(x,)])
    config.setdefault("bits", 4)
    return qcompile.quantize(model.eval(), (x,), passes=passes, ctx=ctx, **config)


def hard(gm):
    for module in gm.modules():
        if isinstance(module, Quantizer):
            module.set_hard(True)
    return gm.eval()


def boundary_ops(gm):
    """(kind, node, operands) of every add of two nodes, cat and average pool in ``gm``."""
    ops = []
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.target is operator.add and all(isinstance(a, torch.fx.Node) for a in node.args):
            ops.append(("add", node, list(node.args)))
        elif node.target is torch.cat:
            ops.append(("cat", node, list(node.args[0])))
        elif isinstance(module, POOLS) or node.target is F.adaptive_avg_pool2d:
            ops.append(("pool", node, [node.args[0]]))
    return ops


def is_boundary_quantizer(gm, node):
    return (node.op == "call_module" and node.target.startswith(f"{BOUNDARY_QUANTIZERS}.")
            and isinstance(gm.get_submodule(node.target), Quantizer))




CASES = [("resnet18", "qil", {"add": 8, "pool": 1}),
         ("mobilenet_v2", "lsq", {"add": 10, "pool": 1})]
CASES += [("branchy", method, {"add": 2, "cat": 1, "pool": 2}) for method in available_methods()]


@pytest.mark.parametrize("arch,method,counts", CASES)
def test_every_add_cat_and_pool_reads_boundary_quantizers(arch, method, counts):
    torch.manual_seed(0)
    model = Branchy() if arch == "branchy" else torchvision.models.get_model(arch, weights=None)
    x = torch.randn(4, 3, 64, 64)
    ctx = qcompile.PassContext()
    gm = quantized(model, x, ctx=ctx, method=method)
    assert [r.name for r in ctx.records][-2:] == ["insert-quantizers", "quantize-boundaries"]
    ops = boundary_ops(gm)
    assert {kind: [k for k, _, _ in ops].count(kind) for kind in counts} == counts
    for kind, node, operands in ops:
        assert all(is_boundary_quantizer(gm, o) for o in operands), node.name
        assert len({o.target for o in operands}) == 1
        meta = operands[0].meta["quant_boundary"]
        quantizer = gm.get_submodule(operands[0].target)
        assert quantizer.method == "lsq", "boundaries take LSQ whatever the layers' method"
        assert meta == {"bits": 8, "method": quantizer.method, "signed": quantizer.signed,
                        "kind": kind, "consumer": node.name}
        suffix = "input" if kind == "pool" else "operands"
        assert operands[0].target == f"{BOUNDARY_QUANTIZERS}.{node.name}_{suffix}"
    out = gm(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()


def test_each_boundary_quantizer_rounds_its_operands_finely_at_eight_bits():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    gm = hard(quantized(with_batch_statistics(torchvision.models.resnet18(weights=None), x), x,
                        method="qil"))
    errors = {}

    def measure(name):
        def hook(module, args, out):
            errors[name] = float((out - args[0]).norm() / args[0].norm())
        return hook

    container = gm.get_submodule(BOUNDARY_QUANTIZERS)
    hooks = [m.register_forward_hook(measure(n)) for n, m in container.named_children()]
    with torch.no_grad():
        gm(x)
    for hook in hooks:
        hook.remove()
    assert len(errors) == 9 and max(errors.values()) < 0.05, errors


@pytest.mark.parametrize("method", ["qil", "lsq"])
def test_eight_bit_boundaries_keep_the_small_cnn_output(method):
    """The pool input quantizer at 8 bits barely moves the logits; at 1 bit the same measure
    sees it move them."""
    torch.manual_seed(0)
    model, data = SmallCNN(), digits()
    calib, test = data.train_x[:64], data.test_x[:64]

    def logits(passes):
        with torch.no_grad():
            return hard(quantized(model, calib, passes=passes, method=method))(test)

    reference = logits(WITHOUT)
    fine = logits(WITHOUT + ["quantize-boundaries"])
    coarse = logits(WITHOUT + ["quantize-boundaries{boundary_bits=1}"])
    error = lambda out: float((out - reference).norm() / reference.norm())  # noqa: E731
    assert error(fine) < 0.05 < error(coarse)
    assert (fine.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


class ScaledConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.small, self.large = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.small(x), 50 * self.large(x)], dim=1)


def test_shared_quantizer_is_calibrated_on_every_operand():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    model = ScaledConcat()
    with torch.no_grad():
        reference = hard(quantized(model, x, passes=WITHOUT, method="qil"))(x)
        out = hard(quantized(model, x, method="qil"))(x)
    large = slice(3, None)
    assert (out[:, large] - reference[:, large]).norm() < 0.02 * reference[:, large].norm()


def test_running_the_pass_again_changes_nothing():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    gm = quantized(Branchy(), x, method="lsq")
    ctx = qcompile.PassContext()
    again = qcompile.PassManager(["quantize-boundaries"]).run(gm, ctx=ctx)
    assert again.code == gm.code
    assert again.state_dict().keys() == gm.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in gm.state_dict().items())
    assert ctx.records[-1].notes == [
        "all 5 residual joins, concatenations and average pools are already quantized"]


def test_an_operand_added_later_joins_the_quantizer_its_partner_reads():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    gm = quantized(Branchy(), x, method="lsq")
    _, add, (first, second) = next(op for op in boundary_ops(gm) if op[0] == "add")
    add.replace_input_with(second, second.args[0])
    gm.graph.erase_node(second)
    gm.recompile()
    modules = len(list(gm.get_submodule(BOUNDARY_QUANTIZERS).children()))
    again = qcompile.PassManager(["quantize-boundaries"]).run(gm, (x,))
    _, _, operands = next(op for op in boundary_ops(again) if op[0] == "add")
    assert all(is_boundary_quantizer(again, o) for o in operands)
    assert {o.target for o in operands} == {first.target}
    assert len(list(again.get_submodule(BOUNDARY_QUANTIZERS).children())) == modules


def test_boundary_bits_option_sets_and_checks_the_bit_width():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    gm = quantized(Branchy(), x, passes=WITHOUT, method="lsq")
    four = qcompile.PassManager(["quantize-boundaries{boundary_bits=4}"]).run(
        gm, (x,), calib_data=[(x,)])
    quantizers = list(four.get_submodule(BOUNDARY_QUANTIZERS).children())
    assert len(quantizers) == 5 and {q.bits for q in quantizers} == {4}
    for bad in ["0", "9", "2.5", "true", "eight"]:
        with pytest.raises(ConfigError, match="boundary_bits must be an integer 1-8"):
            qcompile.PassManager([f"quantize-boundaries{{boundary_bits={bad}}}"]).run(gm, (x,))


def test_dorefa_falls_back_to_lsq_on_signed_add_operands():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    ctx = qcompile.PassContext()
    gm = quantized(torchvision.models.resnet18(weights=None), x, ctx=ctx, method="dorefa",
                   passes=WITHOUT + ["quantize-boundaries{boundary_method=dorefa}"])
    for kind, _, operands in boundary_ops(gm):
        quantizer = gm.get_submodule(operands[0].target)
        if kind == "add":
            assert quantizer.signed and quantizer.method == "lsq"
            assert operands[0].meta["quant_boundary"]["method"] == "lsq"
            assert any(operands[0].target in note and "LSQ" in note
                       for note in ctx.records[-1].notes)
        else:
            assert not quantizer.signed and quantizer.method == "dorefa"


class NoBoundaries(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        width = x.size(2) + x.size(3)
        return F.relu(self.conv(x + 1.0)).flatten(1) * width


def test_graph_without_boundaries_is_left_unchanged():
    x = torch.randn(2, 3, 8, 8)
    ctx = qcompile.PassContext()
    gm = quantized(NoBoundaries(), x, ctx=ctx, method="lsq")
    assert ctx.records[-1].notes == ["no residual joins, concatenations or average pools"]
    assert not hasattr(gm, BOUNDARY_QUANTIZERS)
    assert gm.code == quantized(NoBoundaries(), x, passes=WITHOUT, method="lsq").code
