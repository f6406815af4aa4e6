"""DevFT's pure core: stage schedule, layer grouping, fusion, LoRA transfer, aggregation.

Everything here is math on tensors / arrays and plain Python data: no model, no I/O, no flwr.

Terms, used one way throughout the package:
- *stage*: a phase of training on a submodel of a fixed number of layers L_s;
- *group*: the set of original layers one submodel layer stands for (sorted, lowest = anchor);
- *fusion*: building a group's submodel layer from its layers (differential by default);
- *transfer*: copying a trained submodel layer's LoRA back to every layer of its group;
- *submodel*: the L_s-layer model a stage trains.
"""
