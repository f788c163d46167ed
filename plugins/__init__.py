"""mmc's fused ops (ONNX domain `mmc`): one folder per op with spec, reference and target faces.

Empty in this release: the fusion passes that create these ops land with the fusion library.
"""
