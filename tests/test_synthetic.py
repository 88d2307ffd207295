"""The demo's own LiDAR generator (spconv_lite.synthetic): finite points, and its arguments
checked by name."""

from __future__ import annotations

import numpy as np
import pytest

from spconv_lite.synthetic import lidar_sweep


def test_sweep_points_are_finite_and_above_the_ground():
    points = lidar_sweep(seed=2, num_beams=8, num_azimuth=200)
    assert points.dtype == np.float32 and points.shape[1] == 4 and len(points) > 100
    assert np.isfinite(points).all()
    assert (points[:, 2] > -1.73 - 0.1).all()  # the ground, up to the range noise


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_range=float("inf")), "max_range must be a finite range > 0, got inf"),
    (dict(max_range=0.0), "max_range must be a finite range > 0, got 0.0"),
    (dict(range_noise=float("nan")), "range_noise must be a finite deviation >= 0, got nan"),
    (dict(dropout=float("nan")), r"dropout must be a fraction in \[0, 1\], got nan"),
    (dict(dropout=-1.0), r"dropout must be a fraction in \[0, 1\], got -1.0"),
    (dict(sensor_height=-1.0), "sensor_height must be a finite height > 0, got -1.0"),
])  # fmt: skip
def test_sweep_refuses_arguments_that_would_give_bad_points(kwargs, message):
    # An infinite range made infinite points of the sky's rays; NaN noise NaN points; NaN
    # dropout no points at all, silently.
    with pytest.raises(ValueError, match=message):
        lidar_sweep(num_beams=4, num_azimuth=50, **kwargs)
