"""Deployment to remote hosts: the controller side of the Ansible role (wheelhouse, plan, apply)."""
