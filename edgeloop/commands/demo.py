"""``edgeloop demo``: one turn of the whole lifecycle on the embedded defaults.

Local inventory (three sites on this machine), Prefect's ephemeral API, the bundled ELPV solar cells.
"""

from __future__ import annotations

import argparse
import json

from orchestrator.demo import DemoSettings


def add_commands(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the demo lifecycle (pretrain, edge fine-tune, samples, retrain)")
    defaults = DemoSettings()
    demo.add_argument("-i", "--inventory", default=str(defaults.inventory))
    demo.add_argument("--home", default=str(defaults.home), help="working folder (data, registry, store, sites)")
    demo.add_argument("--pretrain-epochs", type=int, default=defaults.pretrain_epochs)
    demo.add_argument("--retrain-epochs", type=int, default=defaults.retrain_epochs)
    demo.add_argument("--site-timeout", type=float, default=defaults.site_timeout_s)
    demo.add_argument("--keep-agents", action="store_true", help="leave the site agents running afterwards")
    demo.add_argument("--fleet", choices=["shifted", "random"], default=defaults.fleet,
                      help="sites that differ from the cloud's pool (default) or random draws of it")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from flows.lifecycle import lifecycle_flow

    result = lifecycle_flow(inventory=args.inventory, home=args.home, pretrain_epochs=args.pretrain_epochs,
                            retrain_epochs=args.retrain_epochs, site_timeout_s=args.site_timeout, stop_agents=not args.keep_agents,
                            site_data=args.fleet)
    print(json.dumps(result, indent=1, default=str))
    return 0 if result["sites_completed"] else 1
