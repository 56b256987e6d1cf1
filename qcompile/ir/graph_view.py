"""A networkx view of the fx graph, for analysis passes.

Analysis (scale-sharing groups at ``add``/``cat``, layer order, dominators) is easier on a
``networkx.DiGraph`` than on fx's linked list; rewrites still go through the fx graph itself.
"""

import networkx as nx
import torch.fx as fx

from qcompile.ir.shapes import output_shape


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """One graph node per fx node, keyed by the fx node's name; an edge per data dependency.

    Node attributes: ``op`` (fx opcode), ``target`` (string), ``module_type`` (class name for
    ``call_module`` nodes, else None), ``shape`` (output shape if shapes were propagated, else
    None) and ``index`` (position in the fx graph's topological order).
    """
    graph = nx.DiGraph(name=type(gm).__name__)
    modules = dict(gm.named_modules())
    for index, node in enumerate(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        graph.add_node(
            node.name,
            op=node.op,
            target=_target_name(node),
            module_type=type(module).__name__ if module is not None else None,
            shape=output_shape(node),
            index=index,
        )
        for producer in node.all_input_nodes:
            graph.add_edge(producer.name, node.name)
    return graph


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return fx.node._get_qualified_name(node.target)
