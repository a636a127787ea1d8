"""Every checkpoint this project reads or writes. It reads timm's pretrained files, OpenCLIP's, the official
DeiT, DeiT-3, MAE, DINO and MoCo v3 containers, the paper's training checkpoints (arkel23/CLCA) and this
project's own, `.safetensors` too when the optional safetensors package is installed; it never unpickles more
than tensors, containers and argparse.Namespace (the paper's saved arguments). It writes this project's
checkpoints, atomically, as plain dicts that store the model's ModelConfig. Not here: the architecture
(model.py), a run's state (train.py).
"""
import argparse
import math
import os
import pickle
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from model import ModelConfig, ViT, backbone_config, resample_grid
from reduce import METHODS


class CheckpointError(ValueError):
    """A checkpoint that is missing, unsafe to unpickle, or does not fit the model."""


# where timm 0.9.12, the paper's, reads the weights of a tag that are not timm's own copy (`from_open_clip`)
ELSEWHERE = {'vit_base_patch16_clip_224.laion2b':
             'https://huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/resolve/main/open_clip_pytorch_model.bin'}


def pretrained_url(backbone: str) -> str:
    """Where the weights of a tagged name (deit_base_patch16_224.fb_in1k) live: timm's, or ELSEWHERE's."""
    if '.' not in backbone:
        raise CheckpointError(f'{backbone} has no pretrained tag: name one (e.g. {backbone}.augreg_in21k), '
                              'pass a file with --pretrained, or train from scratch with --pretrained none')
    return ELSEWHERE.get(backbone, f'https://huggingface.co/timm/{backbone}/resolve/main/pytorch_model.bin')


def from_open_clip(sd: dict) -> dict:
    """An OpenCLIP checkpoint's image tower ('visual.*') under timm's names. The text tower, the logit scale
    and the projection into the text space ('visual.proj') are not part of a ViT classifier: dropped."""
    names = (('conv1', 'patch_embed.proj'), ('positional_embedding', 'pos_embed'), ('transformer.resblocks.',
             'blocks.'), ('ln_pre', 'norm_pre'), ('ln_post', 'norm'), ('ln_', 'norm'), ('in_proj_', 'qkv.'),
             ('out_proj', 'proj'), ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2'))  # theirs, ours; in this order
    out = {}
    for key, value in sd.items():
        if key.startswith('visual.') and key != 'visual.proj':
            key = key.removeprefix('visual.')
            for theirs, ours in names:
                key = key.replace(theirs, ours)
            out[key] = value
    out['cls_token'] = out.pop('class_embedding').reshape(1, 1, -1)  # (D,) -> (1, 1, D)
    out['pos_embed'] = out['pos_embed'].unsqueeze(0)                  # (1 + P, D) -> (1, 1 + P, D)
    return out


def open_checkpoint(source):
    """The object stored at a path or an http(s) URL (downloaded once into torch.hub's cache), or `source`
    itself if it is already loaded. Unpickles containers, tensors and argparse.Namespace only."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = str(source)
    if path.startswith(('http://', 'https://')):
        name = re.sub(r'[^\w.-]+', '_', path.split('://', 1)[1].split('?')[0])  # unique per URL
        dst = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                torch.hub.download_url_to_file(path, dst)
            except OSError as e:  # URLError and HTTPError are OSErrors
                raise CheckpointError(f'could not download {path} ({e}): download it where there is a network '
                                      'and pass the file (--pretrained PATH), or use --pretrained none') from None
        path = dst
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f'{path} is a .safetensors file: pip install safetensors to read it') from None
        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r'GLOBAL ([\w.]+)', str(e))  # a real checkpoint that holds more than tensors
        if unsafe:
            raise CheckpointError(f'{path} holds a {unsafe.group(1)} object, and unpickling it could run code: '
                                  'refusing it (load only tensors, containers and argparse.Namespace)') from None
        raise CheckpointError(f'{path} is not a PyTorch checkpoint (torch.load cannot read its bytes)') from None
    except (RuntimeError, KeyError, EOFError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:120]})') from None


def tensors(raw) -> dict:
    """The {name: tensor} of a loaded checkpoint, names as saved: containers ('model', 'state_dict', 'module')
    and 'module.' prefixes unwrapped."""
    for key in ('model', 'state_dict', 'module'):
        if isinstance(raw.get(key), dict):
            raw = raw[key]
    return {k.removeprefix('module.'): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def our_names(sd: dict) -> dict:
    """`tensors` under this project's names: OpenCLIP's converted, MoCo's 'base_encoder.' unwrapped, and the
    paper's names of a reduction's learned parts (cluster_layers, score_predictor) made `reducers`."""
    if 'visual.class_embedding' in sd:  # OpenCLIP's release (the paper's CLIP weights)
        sd = from_open_clip(sd)
    sd = {re.sub(r'^(cluster_layers|score_predictor)\.', 'reducers.', k): v for k, v in sd.items()}
    if any(k.startswith('base_encoder.') for k in sd):  # MoCo v3: keep the online encoder only
        sd = {k.removeprefix('base_encoder.'): v for k, v in sd.items() if k.startswith('base_encoder.')}
    return sd


class Weights(NamedTuple):
    """A checkpoint's tensors, flat and under this project's names, and how its position grid
    is resampled to another size: timm 0.9, the paper's, resamples OpenCLIP's release without
    antialiasing, any other file with it."""
    sd: dict
    antialias: bool


def read_checkpoint(source) -> Weights:
    """The weights of anything `open_checkpoint` takes, flattened once: a caller that reads the classes from
    them passes them on to `load_weights`, not the file again."""
    if isinstance(source, Weights):
        return source
    saved = tensors(open_checkpoint(source))
    return Weights(our_names(saved), antialias='visual.class_embedding' not in saved)


def load_weights(model: ViT, source, verbose: bool = True):
    """Load a checkpoint (anything `read_checkpoint` takes) into `model`: resample pos_embed to its grid, drop
    a classifier that does not fit, refuse any other mismatch, start CLR from the loaded CLS if the file has
    none. Returns (missing, unexpected) keys."""
    weights = read_checkpoint(source)
    sd = dict(weights.sd)  # changed below: the caller's copy stays as it was
    own = model.state_dict()
    notes = []
    if 'pos_embed' in sd:
        pos = sd['pos_embed']
        prefix = 0 if model.cfg.no_embed_class else 1  # the CLS row
        extra = sd['clr'].shape[1] if 'clr' in sd and prefix else 0  # the paper's code appends CLR rows
        cells = pos.shape[1] - prefix - extra
        if math.isqrt(cells) ** 2 != cells:
            raise CheckpointError(f'checkpoint pos_embed has {pos.shape[1]} rows, which is no square grid with '
                                  f'{prefix} CLS row(s): is the backbone right (DeiT-3 has no CLS position row)?')
        mine = own['pos_embed'][:, prefix + model.num_patches:]  # this model's CLR rows
        clr_rows = pos[:, prefix + cells:] if extra == mine.shape[1] else mine.to(pos)
        side = math.isqrt(model.num_patches)
        grid = resample_grid(pos[:, prefix:prefix + cells], side, antialias=weights.antialias)
        sd['pos_embed'] = torch.cat([pos[:, :prefix], grid, clr_rows], 1)
        if cells != model.num_patches:
            notes.append(f'resampled pos_embed grid {math.isqrt(cells)}x{math.isqrt(cells)} -> {side}x{side}')
    for k in [k for k in sd if k.startswith('head.')]:
        if k not in own or own[k].shape != sd[k].shape:
            notes.append(f'dropped {k} {tuple(sd.pop(k).shape)} (this model has its own classifier)')
    bad = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}'
           for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f'checkpoint does not fit this model ({len(bad)} shape mismatches, checkpoint vs '
                              f'model): {"; ".join(bad[:3])}: check backbone, patch size, num_clr and num_classes')
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if 'clr' in missing and 'cls_token' in sd:
        model.init_clr()
        missing.remove('clr')
        notes.append('initialised CLR from the loaded CLS token')
    if verbose:
        for what, keys in (('missing (kept as initialised)', missing), ('unexpected (ignored)', unexpected)):
            tops = Counter(k.split('.')[0] for k in keys)  # 'ifa_head.0.1.bias', 'ifa_head.0.4.bias' -> ifa_head (2)
            if keys:
                notes.append(f'{what}: ' + ', '.join(f'{top} ({n})' if n > 1 else top for top, n in tops.items()))
        name = source if isinstance(source, (str, os.PathLike)) else 'a state dict'
        print(f'loaded {len(sd) - len(unexpected)} tensors from {name}' + ''.join('\n  ' + n for n in notes))
    return missing, unexpected


# the paper's code names a model '<method>_<timm name>' (e.g. evit_vit_base_patch16_clip_224.laion2b)
OFFICIAL_NAMES = {'dyvit': 'dynamicvit'}  # where its method's name differs from ours
# ModelConfig field <- the paper's argument name
OFFICIAL_ARGS = {'img_size': 'input_size', 'keep': 'keep_rate', 'loc': 'reduction_loc', 'clc': 'clc', 'cla': 'ifa_head',
                 'num_clr': 'num_clr', 'clc_gap': 'clc_include_gap', 'clc_last': 'clc_recover_at_last'}


def num_classes_in(sd: dict, default: int = 1000) -> int:
    """Classes of a flat state dict's classifier (the CLA head's, else the linear head's), or `default`."""
    classifier = sd.get('ifa_head.0.4.weight', sd.get('head.weight'))
    return classifier.shape[0] if classifier is not None else default


def model_config(raw, num_classes: int | None = None) -> ModelConfig | None:
    """The model a loaded checkpoint describes, or None when it describes none (a timm file, a state dict):
    this project's store their ModelConfig whole; the paper's saved arguments (a Namespace) are translated,
    with the size of the file's classifier, which those arguments do not record: `num_classes` where the caller
    has read it already, else read here."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get('config'), dict):
        try:
            return ModelConfig(**raw['config'])
        except TypeError as e:  # a setting this version of ModelConfig does not have
            raise CheckpointError(f'the checkpoint describes a model this code cannot build ({e}): was it written '
                                  'by another version of this project?') from None
    if not isinstance(raw.get('args'), argparse.Namespace):
        return None
    args = vars(raw['args'])
    if not isinstance(args.get('model'), str):
        raise CheckpointError("the checkpoint's saved arguments name no model: pass the model flags of eval.py")
    prefix, _, backbone = args['model'].partition('_')
    method = OFFICIAL_NAMES.get(prefix, prefix)
    if method not in METHODS:  # a plain ViT: the name is the backbone's
        method, backbone = 'none', args['model']
    fields = {ours: args[theirs] for ours, theirs in OFFICIAL_ARGS.items() if args.get(theirs) is not None}
    try:
        classes = num_classes if num_classes is not None else num_classes_in(read_checkpoint(raw).sd)
        return backbone_config(backbone, method=method, num_classes=classes, **fields)
    except ValueError as e:
        raise CheckpointError(f'the checkpoint describes a model this code cannot build: {e}') from None


def save_checkpoint(model: ViT, path: Path, **state):
    """Write {'model': weights, 'config': the ModelConfig as a dict, **state} atomically: a crash
    mid-write leaves the previous file intact. Loadable with torch.load(weights_only=True)."""
    tmp = path.with_suffix('.tmp')
    with open(tmp, 'wb') as f:
        torch.save(dict(model=model.state_dict(), config=asdict(model.cfg), **state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
