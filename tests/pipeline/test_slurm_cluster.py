"""The test cluster's guard on /etc/slurm/slurm.conf: a link a killed test run left is cleared,
anything else (a site's own config, a live test cluster) is left alone and reported."""

import os

import pytest
import slurm_cluster
from slurm_cluster import CLUSTER_NAME, missing_requirements


@pytest.fixture
def default_conf(tmp_path, monkeypatch):
    path = tmp_path / "etc" / "slurm.conf"
    path.parent.mkdir()
    monkeypatch.setattr(slurm_cluster, "DEFAULT_CONF", path)
    # The daemons' presence is not what these tests are about.
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda b: f"/usr/sbin/{b}")
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
    return path


def _test_cluster_conf(root, pid):
    root.mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"ClusterName={CLUSTER_NAME}\nSlurmctldHost=localhost\n")
    (root / "slurmctld.pid").write_text(f"{pid}\n")
    return conf


def _dead_pid():
    # A pid past the kernel's maximum can never be alive.
    return int(open("/proc/sys/kernel/pid_max").read()) + 1


def test_a_dangling_link_is_cleared(default_conf, tmp_path):
    default_conf.symlink_to(tmp_path / "gone" / "slurm.conf")
    assert missing_requirements() is None
    assert not default_conf.is_symlink()


def test_a_link_to_a_dead_test_cluster_is_cleared(default_conf, tmp_path):
    default_conf.symlink_to(_test_cluster_conf(tmp_path / "slurm0", _dead_pid()))
    assert missing_requirements() is None
    assert not default_conf.is_symlink()


def test_a_live_test_cluster_is_left_alone(default_conf, tmp_path, monkeypatch):
    default_conf.symlink_to(_test_cluster_conf(tmp_path / "slurm0", os.getpid()))
    # This process stands in for slurmctld: its name is what /proc reports for it.
    monkeypatch.setattr(slurm_cluster, "CTLD", open("/proc/self/comm").read().strip())
    assert "exists" in missing_requirements()
    assert default_conf.is_symlink()


def test_a_reused_pid_is_not_a_live_cluster(default_conf, tmp_path):
    # After a restart the dead slurmctld's pid may belong to any process, here this one.
    default_conf.symlink_to(_test_cluster_conf(tmp_path / "slurm0", os.getpid()))
    assert missing_requirements() is None
    assert not default_conf.is_symlink()


def test_a_sites_own_config_is_left_alone(default_conf, tmp_path):
    site = tmp_path / "site.conf"
    site.write_text("ClusterName=production\n")
    default_conf.symlink_to(site)
    assert "exists" in missing_requirements()
    default_conf.unlink()
    default_conf.write_text(f"ClusterName={CLUSTER_NAME}\n")
    assert "exists" in missing_requirements()
    assert default_conf.read_text() == f"ClusterName={CLUSTER_NAME}\n"
