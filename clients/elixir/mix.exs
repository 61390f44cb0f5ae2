defmodule SseGateway.MixProject do
  use Mix.Project

  @version "0.1.0"

  def project do
    [
      app: :sse_gateway,
      version: @version,
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      elixirc_paths: elixirc_paths(Mix.env()),
      # No hex dependencies: HTTP is OTP's :httpc and :gen_tcp, JSON is
      # Elixir's JSON (1.18+), Jason when the host app has it, or our own codec.
      deps: [],
      # :ssl and :public_key are used only for https URLs, started on demand.
      xref: [exclude: [:ssl, :public_key]],
      description: "Client for sse-gateway: publish (sync or buffered), subscribe, tokens",
      docs: [main: "readme", extras: ["README.md"]]
    ]
  end

  def application do
    [
      # :ssl is started on demand for https URLs only.
      extra_applications: [:logger, :inets, :crypto],
      mod: {SseGateway.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
