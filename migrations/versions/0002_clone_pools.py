"""Clone pools: flavors.clone, and how each VM was made (vms.source, vms.template).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Server defaults fill the rows that exist: flavors become clone pools, every VM so far was cold-booted.
    with op.batch_alter_table("flavors") as batch:
        batch.add_column(sa.Column("clone", sa.Boolean(), nullable=False, server_default=sa.true()))
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("source", sa.String(8), nullable=False, server_default="cold"))
        batch.add_column(sa.Column("template", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("template")
        batch.drop_column("source")
    with op.batch_alter_table("flavors") as batch:
        batch.drop_column("clone")
