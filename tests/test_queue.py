"""MemoryQueue: FIFO order, wrap-around, labels/groups, and losses with queue keys."""

import pytest
import torch

from contrastkit import MemoryQueue, info_nce, supcon_loss


def rows(start, count, dim=3):
    """Keys whose first entry is their running number, so the FIFO order is visible."""
    keys = torch.zeros(count, dim)
    keys[:, 0] = torch.arange(start, start + count, dtype=torch.float32)
    return keys


def numbers(queue):
    return queue.keys[:, 0].long().tolist()


def test_fifo_order_and_wrap_around():
    queue = MemoryQueue(5, 3)
    assert len(queue) == 0 and queue.keys.shape == (0, 3) and queue.labels is None
    queue.enqueue(rows(0, 3), labels=torch.arange(3))
    assert numbers(queue) == [0, 1, 2] and queue.labels.tolist() == [0, 1, 2]
    queue.enqueue(rows(3, 4), labels=torch.arange(3, 7))  # wraps: 0 and 1 are dropped
    assert numbers(queue) == [2, 3, 4, 5, 6] and queue.labels.tolist() == [2, 3, 4, 5, 6]
    queue.enqueue(rows(7, 1), labels=torch.tensor([7]))
    assert numbers(queue) == [3, 4, 5, 6, 7] and len(queue) == 5


def test_enqueue_larger_than_queue_keeps_the_newest():
    queue = MemoryQueue(4, 3)
    queue.enqueue(rows(0, 2), groups=torch.tensor([10, 11]))
    queue.enqueue(rows(2, 9), groups=torch.arange(12, 21))
    assert numbers(queue) == [7, 8, 9, 10]
    assert queue.groups.tolist() == [17, 18, 19, 20] and queue.labels is None
    queue.enqueue(rows(11, 3), groups=torch.arange(21, 24))
    assert numbers(queue) == [10, 11, 12, 13]


def test_keys_are_detached_cast_and_state_survives_state_dict():
    queue = MemoryQueue(6, 2, dtype=torch.float64)
    keys = torch.randn(4, 2, requires_grad=True)
    queue.enqueue(keys * 2)
    assert not queue.keys.requires_grad and queue.keys.dtype == torch.float64
    torch.testing.assert_close(queue.keys, (keys * 2).detach().double())
    restored = MemoryQueue(6, 2, dtype=torch.float64)
    restored.load_state_dict(queue.state_dict())
    assert len(restored) == 4 and torch.equal(restored.keys, queue.keys)
    queue.reset()
    assert len(queue) == 0 and queue.keys.shape == (0, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="size must be a positive int"):
        MemoryQueue(0, 3)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        MemoryQueue(4, True)
    with pytest.raises(TypeError, match="dtype"):
        MemoryQueue(4, 3, dtype=torch.long)
    queue = MemoryQueue(4, 3)
    with pytest.raises(ValueError, match="dim 3"):
        queue.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match="labels must hold one entry per key"):
        queue.enqueue(torch.randn(2, 3), labels=torch.arange(3))
    with pytest.raises(ValueError, match="NaN"):
        queue.enqueue(torch.full((2, 3), float("inf")))
    queue.enqueue(torch.randn(2, 3), labels=torch.arange(2))
    with pytest.raises(ValueError, match="holds labels"):
        queue.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="holds no groups"):
        queue.enqueue(torch.randn(2, 3), labels=torch.arange(2), groups=torch.arange(2))
    with pytest.raises(TypeError, match="queue must be a MemoryQueue"):
        supcon_loss(torch.randn(4, 3), torch.arange(4), queue=torch.randn(3, 3))
    wrong_dim = MemoryQueue(4, 5)
    wrong_dim.enqueue(torch.randn(2, 5), labels=torch.arange(2))
    with pytest.raises(ValueError, match="keys of dim 5"):
        supcon_loss(torch.randn(4, 3), torch.arange(4), queue=wrong_dim)


def test_supcon_with_queue_equals_info_nce_over_concatenated_keys():
    torch.manual_seed(0)
    features, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 3])
    queue = MemoryQueue(5, 4, dtype=torch.float64)
    queue.enqueue(torch.randn(3, 4, dtype=torch.float64), labels=torch.tensor([2, 3, 4]))
    queue.enqueue(torch.randn(4, 4, dtype=torch.float64), labels=torch.tensor([3, 0, 0, 5]))
    with_queue = supcon_loss(features, labels, queue=queue)
    concatenated = info_nce(
        features, torch.cat([features, queue.keys]), labels=labels,
        key_labels=torch.cat([labels, queue.labels]), self_key_offset=0, backend="reference",
    )
    torch.testing.assert_close(with_queue, concatenated)
    # Sample 2 (label 2) has no positive in the batch, but one in the queue... until it leaves.
    assert queue.labels.tolist() == [4, 3, 0, 0, 5]
    assert supcon_loss(features, labels, queue=queue, reduction="none")[2] == 0
    assert supcon_loss(features, labels, queue=queue, reduction="none")[5] > 0


def test_empty_queue_is_no_queue():
    torch.manual_seed(1)
    features, labels = torch.randn(5, 2, 3), torch.tensor([0, 1, 0, 2, 1])
    empty = MemoryQueue(4, 3)
    torch.testing.assert_close(supcon_loss(features, labels, queue=empty), supcon_loss(features, labels))


def test_append_queue_is_one_rule_for_labels_and_groups():
    from contrastkit import SHARED, append_queue

    keys, key_labels, key_groups = torch.randn(4, 3), torch.tensor([0, 5, -1, 2]), torch.tensor([0, 0, 1, 1])
    assert append_queue(None, keys, key_labels, key_groups) == (keys, key_labels, key_groups)
    labeled = MemoryQueue(3, 3)
    labeled.enqueue(torch.randn(3, 3), labels=torch.tensor([2, 7, 2]))
    # The queue's labels when the loss uses them; groups SHARED: candidates of every group.
    k, kl, kg = append_queue(labeled, keys, key_labels, key_groups, use_queue_labels="a loss")
    torch.testing.assert_close(k, torch.cat([keys, labeled.keys]))
    assert kl.tolist() == [0, 5, -1, 2, 2, 7, 2] and kg.tolist() == [0, 0, 1, 1, SHARED, SHARED, SHARED]
    # Otherwise one label no query or key has, and never ignore_index: negatives of every anchor.
    _, kl, kg = append_queue(labeled, keys, key_labels, None, labels=torch.tensor([9, 0]), ignore_index=12)
    assert kl.tolist()[4:] == [13, 13, 13] and kg is None
    _, kl, _ = append_queue(labeled, keys, key_labels, labels=torch.tensor([9, 0]))
    assert kl.tolist()[4:] == [10, 10, 10]
    unlabeled = MemoryQueue(2, 3)
    unlabeled.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="a loss needs a queue that holds labels"):
        append_queue(unlabeled, keys, key_labels, use_queue_labels="a loss")
    with pytest.raises(ValueError, match="dim"):
        append_queue(labeled, torch.randn(4, 5), key_labels)
    with pytest.raises(TypeError, match="MemoryQueue"):
        append_queue("queue", keys, key_labels)


def test_a_float16_queue_refuses_keys_that_overflow_it():
    queue = MemoryQueue(4, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        queue.enqueue(torch.full((2, 3), 1e5))
    assert len(queue) == 0
    queue.enqueue(torch.full((2, 3), 6e4))  # within float16's range
    assert torch.isfinite(queue.keys).all()


def test_bad_labels_and_groups_are_refused_at_enqueue():
    queue = MemoryQueue(4, 3)
    with pytest.raises(ValueError, match="labels must be class ids"):
        queue.enqueue(torch.randn(2, 3), labels=torch.tensor([0, -5]))
    with pytest.raises(ValueError, match="groups must be"):
        queue.enqueue(torch.randn(2, 3), groups=torch.tensor([0, -2]))
    queue.enqueue(torch.randn(2, 3), labels=torch.tensor([0, -1]))  # -1: left out by the default ignore_index


def test_load_state_dict_refuses_counters_that_describe_no_queue():
    queue = MemoryQueue(5, 3)
    queue.enqueue(torch.randn(3, 3))
    state = queue.state_dict()
    restored = MemoryQueue(5, 3)
    restored.load_state_dict(state)
    assert len(restored) == 3 and torch.equal(restored.keys, queue.keys)
    for bad in ([0, 99, 0, 0], [7, 3, 0, 0], [1, 3, 0, 0], [0, 0, 2, 0]):
        state["state"] = torch.tensor(bad)
        with pytest.raises(ValueError, match="does not describe a queue of size 5"):
            MemoryQueue(5, 3).load_state_dict(state)


def test_enqueue_reads_nothing_from_the_device_with_value_checks_off():
    import contrastkit as ck
    from benchmarks.op_budget import count_ops

    queue = MemoryQueue(8, 3)
    keys, labels = torch.randn(3, 3), torch.tensor([0, 1, 2])
    with ck.value_checks(False):
        counted = count_ops(lambda: (queue.enqueue(keys, labels=labels), queue.keys, queue.labels), warmup=False)
    assert counted.syncs == 0, counted.names
    assert len(queue) == 3
