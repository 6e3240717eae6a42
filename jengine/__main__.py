from jengine.cli import run

run()
