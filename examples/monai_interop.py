"""contrastkit's losses in a MONAI training loop: a MONAI network, MONAI transforms and DiceCELoss,
plus pseudo-label (prototype) contrast on the labeled images and cross-level contrast on the
unlabeled ones. The only contrastkit pieces are `with_projection` and the two losses.

    pip install -e ".[examples,monai]"
    python examples/monai_interop.py          # synthetic polyps: test Dice ~0.68, ~2 min on a CPU
    python examples/monai_interop.py --data ../shared/data/kvasir-seg --image-size 128 --iterations 1500
"""

import argparse
import json
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, RandFlipd, RandRotate90d
from tqdm import tqdm

from contrastkit import CrossLevelContrast, PseudoLabelContrast, cross_level_views
from contrastkit.data import SegmentationFolder, SyntheticPolyps
from contrastkit.models import with_projection


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1; got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an images/ + masks/ folder (default: synthetic polyps)")
    parser.add_argument("--image-size", type=positive, default=64, help="a multiple of 32 (4 poolings, 2x2 grid)")
    parser.add_argument("--iterations", type=positive, default=300)
    parser.add_argument("--labeled", type=positive, default=20, help="labeled training images")
    parser.add_argument("--batch", type=positive, default=4, help="labeled and unlabeled images per step, each")
    parser.add_argument("--width", type=positive, default=8, help="BasicUNet's first feature width")
    parser.add_argument("--contrast-weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/monai")
    args = parser.parse_args(argv)
    if args.image_size % 32:
        parser.error(f"--image-size must be a multiple of 32; got {args.image_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = (SegmentationFolder(args.data, size=args.image_size) if args.data
            else SyntheticPolyps(3 * args.labeled + 40, size=args.image_size, seed=args.seed))
    order = torch.randperm(len(data)).tolist()
    test, train = order[:len(data) // 5], order[len(data) // 5:]
    labeled, unlabeled = train[:args.labeled], train[args.labeled:]
    augment = Compose([RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
                       RandRotate90d(["image", "label"], prob=0.5)])

    def batch(indices):
        items = [augment({"image": data[i][0], "label": data[i][1]}) for i in indices]
        return (torch.stack([item["image"].as_tensor() for item in items]),
                torch.stack([item["label"].as_tensor() for item in items]))

    w = args.width
    unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(w, w, 2 * w, 4 * w, 8 * w, w))
    net = with_projection(unet, layer="upcat_1", channels=w, proj_dim=32)  # its full-resolution decoder map
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    prototype_contrast = PseudoLabelContrast(mode="prototype", num_classes=2, include_background=True)
    cross_level = CrossLevelContrast()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    pick = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.iterations), desc="monai + contrastkit")
    for _ in bar:
        images, masks = batch([labeled[i] for i in torch.randint(len(labeled), (args.batch,), generator=pick)])
        out = net(images, return_features=True)
        supervised = dice_ce(out.logits, masks)
        contrast = prototype_contrast(out.projection, masks[:, 0].long())
        if unlabeled:
            raw, _ = batch([unlabeled[i] for i in torch.randint(len(unlabeled), (args.batch,), generator=pick)])
            views = cross_level_views(net, raw, grid=2)
            contrast = contrast + cross_level(views.global_map, views.local_map)
        loss = supervised + args.contrast_weight * contrast
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(dice_ce=f"{supervised.item():.3f}", contrast=f"{contrast.item():.3f}")

    net.eval()
    metric = DiceMetric(include_background=False)
    with torch.no_grad():
        for index in test:
            image, mask = data[index]
            prediction = net(image[None]).argmax(dim=1, keepdim=True)
            metric(torch.cat([prediction == 0, prediction == 1], dim=1), torch.cat([mask == 0, mask == 1])[None])
    dice = metric.aggregate().item()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "test_dice": dice, "test_images": len(test)}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    print(f"test Dice (MONAI DiceMetric, foreground) {dice:.3f} on {len(test)} images; "
          f"wrote {out_dir / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
