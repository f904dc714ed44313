"""Which parts of our caffe.proto come from Caffe forks rather than BVLC Caffe.

caffe.proto is BVLC Caffe's format plus the parameters of the widely used forks (caffe-ssd,
py-faster-rcnn, SegNet, PSPNet, ShuffleNet, ...). This table names those additions, so that
the proto test can hold everything else to real Caffe's definition, and so that `inspect`
can say which fork a field of a user's net belongs to. The comments in caffe.proto give the
field numbers' provenance and the clashes between forks.
"""

from __future__ import annotations

SSD = "caffe-ssd (weiliu89/caffe)"
FASTER_RCNN = "py-faster-rcnn (rbgirshick/caffe-fast-rcnn)"
OPENCV = "OpenCV's Caffe importer (opencv-caffe.proto)"
RFCN = "R-FCN (daijifeng001/caffe-rfcn)"
SEGNET = "SegNet (alexgkendall/caffe-segnet)"
SEGNET_PSPNET = "SegNet / PSPNet (caffe-segnet, hszhao/PSPNet)"
PSPNET = "PSPNet / DeepLab (hszhao/PSPNet)"
SHUFFLENET = "ShuffleNet (farmingyard/ShuffleNet)"
CEIL_MODE = "BVLC/caffe PR #3057 (DenseNet, ENet ports)"
RELU6 = "MobileNet v2 ports' ReLU6 layer"

# Messages that exist only in forks: full name -> fork.
FORK_MESSAGES: dict[str, str] = {
    "caffe.PermuteParameter": SSD,
    "caffe.NormalizeParameter": SSD,
    "caffe.PriorBoxParameter": SSD,
    "caffe.PriorBoxParameter.CodeType": SSD,
    "caffe.NonMaximumSuppressionParameter": SSD,
    "caffe.ResizeParameter": SSD,
    "caffe.ResizeParameter.Resize_mode": SSD,
    "caffe.ResizeParameter.Pad_mode": SSD,
    "caffe.ResizeParameter.Interp_mode": SSD,
    "caffe.SaveOutputParameter": SSD,
    "caffe.DetectionOutputParameter": SSD,
    "caffe.ROIPoolingParameter": FASTER_RCNN,
    "caffe.ProposalParameter": OPENCV,
    "caffe.PSROIPoolingParameter": RFCN,
    "caffe.BNParameter": SEGNET_PSPNET,
    "caffe.BNParameter.BNMode": SEGNET,
    "caffe.BNParameter.Engine": SEGNET_PSPNET,
    "caffe.UpsampleParameter": SEGNET,
    "caffe.InterpParameter": PSPNET,
    "caffe.ShuffleChannelParameter": SHUFFLENET,
    "caffe.ReLU6Parameter": RELU6,
}

# Fork fields added to BVLC messages: (message full name, field name) -> fork.
FORK_FIELDS: dict[tuple[str, str], str] = {
    ("caffe.LayerParameter", "permute_param"): SSD,
    ("caffe.LayerParameter", "prior_box_param"): SSD,
    ("caffe.LayerParameter", "detection_output_param"): SSD,
    ("caffe.LayerParameter", "norm_param"): SSD,
    ("caffe.LayerParameter", "roi_pooling_param"): FASTER_RCNN,
    ("caffe.LayerParameter", "proposal_param"): OPENCV,
    ("caffe.LayerParameter", "psroi_pooling_param"): RFCN,
    ("caffe.LayerParameter", "bn_param"): SEGNET_PSPNET,
    ("caffe.LayerParameter", "upsample_param"): SEGNET,
    ("caffe.LayerParameter", "interp_param"): PSPNET,
    ("caffe.LayerParameter", "shuffle_channel_param"): SHUFFLENET,
    ("caffe.LayerParameter", "relu6_param"): RELU6,
    ("caffe.PoolingParameter", "ceil_mode"): CEIL_MODE,
    ("caffe.DropoutParameter", "scale_train"): FASTER_RCNN,
}


def fork_of(message: str, field: str | None = None) -> str | None:
    """The fork a message (or one of its fields) comes from; None for BVLC Caffe's own."""
    if message in FORK_MESSAGES:
        return FORK_MESSAGES[message]
    return FORK_FIELDS.get((message, field)) if field is not None else None
