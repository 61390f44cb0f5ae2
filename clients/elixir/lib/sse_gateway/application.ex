defmodule SseGateway.Application do
  @moduledoc """
  The OTP application: the `:httpc` profile, the registry and supervisor of
  streams, the ETS table of their last ids, and the asynchronous buffer
  (`SseGateway.Buffer`, named `SseGateway.Buffer`, started with the
  application's config; idle unless `mode: :async` or a call asks for it).
  """

  use Application

  @impl true
  def start(_type, _args) do
    :ok = SseGateway.HTTP.start_profile()

    children = [
      SseGateway.Table,
      {Registry, keys: :unique, name: SseGateway.Registry},
      {Registry, keys: :duplicate, name: SseGateway.Test.Registry},
      {DynamicSupervisor, name: SseGateway.StreamSupervisor, strategy: :one_for_one},
      {Task.Supervisor, name: SseGateway.TaskSupervisor},
      {SseGateway.Buffer, name: SseGateway.Buffer}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: SseGateway.Supervisor)
  end

  @impl true
  def stop(_state) do
    :inets.stop(:httpc, SseGateway.HTTP.profile())
    :ok
  end
end

defmodule SseGateway.Table do
  @moduledoc "Owns the public ETS table where each stream keeps its last id."
  use GenServer

  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @impl true
  def init(nil) do
    :ets.new(SseGateway.Stream.table(), [:named_table, :public, :set, write_concurrency: true])
    {:ok, nil}
  end
end
