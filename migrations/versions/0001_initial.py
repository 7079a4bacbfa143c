"""Initial inventory: flavors, VMs, events.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flavors",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("kernel", sa.String(4096), nullable=True),
        sa.Column("initrd", sa.String(4096), nullable=True),
        sa.Column("cmdline_extra", sa.String(1024), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("mem_mib", sa.Integer(), nullable=False),
        sa.Column("pool_min", sa.Integer(), nullable=False),
        sa.Column("pool_target", sa.Integer(), nullable=False),
        sa.Column("max_age_s", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("flavor", sa.String(63), nullable=False),
        sa.Column("flavor_generation", sa.Integer(), nullable=False),
        sa.Column("pooled", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("mem_mib", sa.Integer(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("api_socket", sa.String(255), nullable=False),
        sa.Column("console_path", sa.String(4096), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("ready_at", UTCDateTime(), nullable=True),
        sa.Column("claimed_at", UTCDateTime(), nullable=True),
        sa.Column("stopped_at", UTCDateTime(), nullable=True),
        sa.Column("boot_ms", sa.JSON(), nullable=True),
        sa.Column("timeline_ms", sa.JSON(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_vms_state", "vms", ["state"])
    op.create_index("ix_vms_flavor_state", "vms", ["flavor", "state"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("vm_id", sa.String(16), nullable=True),
        sa.Column("flavor", sa.String(63), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_events_vm_id", "events", ["vm_id"])
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_events_at", table_name="events")
    op.drop_index("ix_events_vm_id", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_vms_flavor_state", table_name="vms")
    op.drop_index("ix_vms_state", table_name="vms")
    op.drop_table("vms")
    op.drop_table("flavors")
