import networkx as nx
import torch
import torchvision

import qcompile


def test_networkx_view_mirrors_the_fx_graph():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = qcompile.trace(model, (x,))
    graph = qcompile.to_networkx(gm)
    assert graph.number_of_nodes() == len(gm.graph.nodes)
    assert nx.is_directed_acyclic_graph(graph)
    expected_edges = sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    assert graph.number_of_edges() == expected_edges
    conv1 = graph.nodes["conv1"]
    assert conv1["op"] == "call_module" and conv1["module_type"] == "Conv2d"
    assert conv1["shape"] == (1, 64, 16, 16)
    assert graph.nodes["x"]["op"] == "placeholder"
    order = list(nx.topological_sort(graph))
    assert order.index("conv1") < order.index("fc")
    # a residual block joins two paths: the add has two producers
    adds = [n for n, d in graph.nodes(data=True) if d["target"] == "_operator.add"]
    assert adds and all(graph.in_degree(n) == 2 for n in adds)


def test_shapes_are_none_without_propagation():
    gm = qcompile.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    graph = qcompile.to_networkx(gm)
    assert all(data["shape"] is None for _, data in graph.nodes(data=True))
